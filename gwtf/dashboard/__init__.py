"""The live web dashboard of a run (`gwtf dashboard`): a DHT client's read-only view of the records and telemetry.

Files:
    model.py    RunWatch: what the dashboard knows of a run across polls (nodes and their states, merged history,
                events) and the JSON state the page draws; pure, fed records and telemetry
    server.py   the aiohttp app (the page, its static files, GET /api/state) and the poller that feeds the model
    static/     index.html, app.js, style.css, and vendor/ (uPlot and Cytoscape.js, minified, with their licenses)
"""
