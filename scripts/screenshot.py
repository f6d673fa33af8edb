"""Open a Dagster asset page in headless Chromium (DevTools protocol), click its [Show Markdown], save a PNG.

    .venv/bin/python scripts/screenshot.py "http://127.0.0.1:3000/assets/backfill_report?view=events" report.png

Needs `chromium` (apt-get install -y chromium) and websocket-client; the webserver must be up. On a loopback
origin Dagster first shows a sign-up dialog until the instance records it as seen:
curl -X POST -H 'Content-Type: application/json' -d '{"query":"mutation { setNuxSeen }"}' http://127.0.0.1:3000/graphql
"""

import base64
import json
import subprocess
import sys
import time
import urllib.request

import websocket

url, out = sys.argv[1], sys.argv[2]
port = 9333
chrome = subprocess.Popen(
    [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--remote-debugging-port={port}",
        f"--remote-allow-origins=http://127.0.0.1:{port}",
        "--window-size=1400,1000",
        "--user-data-dir=/tmp/plan-cdp-profile",
        "about:blank",
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
try:
    for _ in range(60):
        try:
            tabs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
            page = next(t for t in tabs if t["type"] == "page")
            break
        except Exception:
            time.sleep(0.5)
    ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
    n = [0]

    def call(method, **params):
        n[0] += 1
        ws.send(json.dumps({"id": n[0], "method": method, "params": params}))
        while True:
            msg = json.loads(ws.recv())
            if msg.get("id") == n[0]:
                return msg.get("result", {})

    call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)
    call("Page.navigate", url=url)
    clicked = None
    for _ in range(60):
        time.sleep(1)
        r = call(
            "Runtime.evaluate",
            expression="""(() => { const el = [...document.querySelectorAll('button,a,span,div')]
            .find(e => e.childElementCount === 0 && e.textContent.trim() === '[Show Markdown]');
            if (!el) return false; el.click(); return true; })()""",
            returnByValue=True,
        )
        if r.get("result", {}).get("value"):
            clicked = True
            break
    time.sleep(3)
    shot = call("Page.captureScreenshot", format="png")
    open(out, "wb").write(base64.b64decode(shot["data"]))
    print("clicked" if clicked else "no [Show Markdown] found", out)
finally:
    chrome.terminate()
    chrome.wait(10)
