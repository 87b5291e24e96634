"""The node runtime: relays and data nodes of a live swarm, one concept a file.

Files:
    spec.py           RunSpec (what every node of a run agrees on, from the run record), NodeOptions (a node's own
                      capacity and region, from its join flags), run_spec
    config.py         IterationConfig: the bounds on a microbatch's legs and an iteration's end
    schema.py         the RPC schema: the meta fields and tensors of every handler, for validators and builders
    node.py           NodeBase: transport, membership record and heartbeat, the compute thread, bounded peer calls,
                      the node's router (started with the node, closed with it)
    state.py          fetch_state: a stage's parameters and optimizer state from live replicas, at one version
    views.py          view_builder: membership records -> the SwarmView a router plans over
    relay_state.py    RelayBase: a relay's state and the helpers its layers share (validation, keys, tasks)
    joining.py        RelayJoining: join, state download, stage rebuild (the run's recovery strategy), catch-up
    iteration_end.py  RelayIterationEnd: average with the stage's replicas and step; advance a stale stage;
                      resync a replica whose weights differ from its stage's majority
    consistency.py    the replicas' weight hashes compared per stage after a step; the odd ones resynchronised;
                      stage 0 compared across the data nodes the same way
    relay.py          RelayNode: serving forward, backward, recompute, resend, regrad, release
    flights.py        Flight, IterationReport, FlightLegs: a data node's microbatches on their routes, both legs
    datanode.py       DataNode: stage 0, the iteration (plan waves, run flights), readiness, stale stages, its end
    stage0_copy.py    Stage0Keeper, push_copy, newest_copy, copy_parts: stage 0 copied to stage 1's replicas after
                      each step in byte-sized parts, so a new data node takes it and the step when every data node died
    assembly.py       module_builder, make_schedule, make_data_node: nodes from a run spec

A microbatch: DataNode._plan_wave (router.plan) -> FlightLegs._forward_leg (embed, `forward` to stage 1) ->
RelayNode._forward on each stage -> the last stage's `head` back to the data node -> FlightLegs._run_flight (loss)
-> FlightLegs._backward_leg (`backward` to stage S) -> RelayNode._backward on each stage -> `embed_grad` ->
DataNode._finish_iteration (`end_iteration`) -> RelayIterationEnd._finish_iteration (average, step).
"""
