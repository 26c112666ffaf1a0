//! A small Chrome DevTools Protocol client for `tests/serve.rs`: starts the
//! system's headless Chromium on a free port and talks to one page over a
//! websocket (`tungstenite`). Downloads nothing.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// The command that installs a browser, for the failure message.
pub const INSTALL: &str = "cargo xtask setup (as root it runs `apt-get install -y \
    chromium-headless-shell`), or install Debian's chromium-headless-shell or chromium yourself, \
    or point VLMATCH_TEST_CHROMIUM at a Chromium binary";

/// The browser binary: `VLMATCH_TEST_CHROMIUM`, else the first of
/// `chromium-headless-shell`, `chromium`, `chromium-browser` on `PATH`.
pub fn find_chromium() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("VLMATCH_TEST_CHROMIUM") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "VLMATCH_TEST_CHROMIUM={} is not a file; {INSTALL}",
                p.display()
            ))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium-headless-shell", "chromium", "chromium-browser"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(format!(
        "no headless Chromium on this machine (looked for VLMATCH_TEST_CHROMIUM, then \
         chromium-headless-shell, chromium, chromium-browser on PATH); install one: {INSTALL}"
    ))
}

/// A running headless Chromium, killed on drop with every process it
/// started. Debian's `/usr/bin/chromium-headless-shell` is a shell script
/// that runs the browser as its child (no `exec`), so the browser gets its
/// own process group and the whole group is killed.
pub struct Browser {
    child: Child,
    devtools: SocketAddr,
}

impl Browser {
    pub fn launch(bin: &Path, profile: &Path) -> Browser {
        let mut child = Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-extensions",
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1100,720",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            for line in stderr.lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(Ok(url.trim().to_string()));
                } else if seen.len() < 20 {
                    seen.push(line);
                }
            }
            let _ = tx.send(Err(seen.join("\n")));
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(url)) => url,
            other => {
                kill_group(&mut child);
                panic!(
                    "{} did not open its DevTools port: {other:?}",
                    bin.display()
                )
            }
        };
        let host = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .expect("ws://HOST:PORT/...");
        Browser {
            child,
            devtools: host.parse().expect("a DevTools address"),
        }
    }

    /// The first page target's websocket.
    pub fn page(&self) -> Page {
        let mut c = vlmatch::serve::load::Client::connect(self.devtools).expect("DevTools HTTP");
        let list = c
            .request("GET", "/json/list", None, b"")
            .expect("DevTools /json/list")
            .json();
        let ws = list
            .as_array()
            .and_then(|l| l.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("no page target in {list}"))
            .to_string();
        let (socket, _) = tungstenite::connect(ws.as_str()).expect("the page's websocket");
        if let MaybeTlsStream::Plain(s) = socket.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        }
        Page { socket, next: 0 }
    }
}

/// SIGKILL to the process group `child` leads (its own, from
/// `process_group(0)`), then reaps `child`.
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

pub struct Page {
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    next: u64,
}

impl Page {
    /// Call `method`; its result, or the protocol's error.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next += 1;
        let id = self.next;
        let msg = json!({ "id": id, "method": method, "params": params });
        self.socket
            .send(Message::text(msg.to_string()))
            .map_err(|e| format!("{method}: {e}"))?;
        loop {
            let m = self.socket.read().map_err(|e| format!("{method}: {e}"))?;
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(text.as_str()).map_err(|e| e.to_string())?;
            if v["id"].as_u64() != Some(id) {
                continue; // an event
            }
            if let Some(e) = v.get("error") {
                return Err(format!("{method}: {e}"));
            }
            return Ok(v["result"].clone());
        }
    }

    /// The value of a JavaScript expression (promises awaited).
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .unwrap();
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Wait until `condition` is true in the page.
    pub fn wait_for(&mut self, condition: &str, what: &str) {
        let start = Instant::now();
        while self.eval(&format!("!!({condition})")) != json!(true) {
            if start.elapsed() > Duration::from_secs(30) {
                let body = self.eval("document.body ? document.body.innerText : ''");
                panic!("the page never showed {what} ({condition}); it shows: {body}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node id of the first element matching `selector`.
    pub fn node(&mut self, selector: &str) -> i64 {
        let root = self.call("DOM.getDocument", json!({})).unwrap()["root"]["nodeId"].clone();
        let n = self
            .call(
                "DOM.querySelector",
                json!({ "nodeId": root, "selector": selector }),
            )
            .unwrap()["nodeId"]
            .as_i64()
            .unwrap_or(0);
        assert!(n != 0, "no element `{selector}` in the page");
        n
    }

    /// A PNG of the viewport.
    pub fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine;
        let r = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .unwrap();
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("base64 screenshot")
    }
}
