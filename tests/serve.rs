//! `vlmatch serve` as a user meets it: the binary on a free loopback port,
//! against a micro run of `configs/vlmatch.toml` (so the VL-RTD
//! discriminator is trained) and an index of the held-out images. The page
//! in a real headless Chromium (its shown probability equals `/match`'s,
//! each caption word carries its shade; a screenshot is saved under
//! `target/tmp/serve/`), bad requests refused with 4xx while the server
//! keeps serving, a bounded load test, and SIGTERM draining in-flight
//! requests with exit status 0. Without a browser the page test fails
//! with the install command.

#[path = "serve/cdp.rs"]
mod cdp;
mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use vlmatch::serve::load::{self, Client};

/// The run, the held-out annotations (16 PNG images, 48 captions) and an
/// index of them, made once.
struct Fixture {
    run: PathBuf,
    heldout: PathBuf,
    index: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = scratch("serve-fixture");
        let (run, heldout) = vlmatch_run_and_heldout(&dir);
        let index = dir.join("index");
        vlmatch::commands::matcher::embed_cmd(&vlmatch::commands::matcher::EmbedArgs {
            checkpoint: run.clone(),
            data: Some(heldout.join("annotations.jsonl").display().to_string()),
            captions: None,
            image_root: None,
            split: None,
            out: index.clone(),
            dtype: vlmatch::matcher::index::Dtype::F32,
            only: Some("images".into()),
            chunk: 64,
            batch: Some(16),
            sets: vec![],
            quiet: true,
        })
        .unwrap();
        Fixture {
            run,
            heldout,
            index,
        }
    })
}

/// Server tests take turns: the load test's timings and the browser should
/// not share the CPU with another server.
static TURN: Mutex<()> = Mutex::new(());

/// A `vlmatch serve` process, killed on drop unless stopped.
struct Server {
    child: Child,
    addr: SocketAddr,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let f = fixture();
        let mut child = Command::new(env!("CARGO_BIN_EXE_vlmatch"))
            .arg("serve")
            .arg("--checkpoint")
            .arg(&f.run)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, stderr) = std::sync::mpsc::channel();
        let err = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(addr) = line.trim().strip_prefix("listening on http://") else {
            let log: Vec<String> = stderr.try_iter().collect();
            panic!("vlmatch serve did not start: {line:?}\n{}", log.join("\n"));
        };
        Server {
            addr: addr.parse().unwrap(),
            child,
            stderr,
        }
    }

    fn client(&self) -> Client {
        Client::connect(self.addr).unwrap()
    }

    fn log(&self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn image(n: usize) -> Vec<u8> {
    std::fs::read(fixture().heldout.join(format!("{n:04}.png"))).unwrap()
}

/// The first caption of held-out image 0.
fn caption0() -> String {
    let text = std::fs::read_to_string(fixture().heldout.join("captions.txt")).unwrap();
    text.lines()
        .next()
        .unwrap()
        .split('\t')
        .nth(1)
        .unwrap()
        .to_string()
}

fn post_match(c: &mut Client, image: &[u8], caption: &str) -> load::Response {
    let (kind, body) = load::multipart(image, caption);
    c.request("POST", "/match", Some(&kind), &body).unwrap()
}

fn assert_refused(r: &load::Response, status: u16, says: &str) {
    let msg = r.json()["error"].as_str().unwrap_or("").to_string();
    assert_eq!(r.status, status, "{msg}");
    assert!(msg.contains(says), "`{msg}` should say `{says}`");
}

#[test]
fn match_search_and_health_answer_and_bad_requests_get_4xx() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let f = fixture();
    let index = f.index.display().to_string();
    let s = Server::start(&[
        "--addr",
        "127.0.0.1:0",
        "--index",
        &index,
        "--set",
        "data.max_image_bytes=16777216",
    ]);
    let mut c = s.client();
    let health = c.request("GET", "/health", None, b"").unwrap().json();
    let cfg = vlmatch::run::run_config(&f.run, &[]).unwrap().config;
    let ckpt = vlmatch::checkpoint::newest_intact(&f.run).unwrap();
    let fp = vlmatch::matcher::index::Fingerprint::of(&cfg, &ckpt).unwrap();
    assert_eq!(health["fingerprint"], serde_json::to_value(&fp).unwrap());
    assert_eq!(health["discriminator"], json!(true));

    let good = post_match(&mut c, &image(0), &caption0());
    assert_eq!(good.status, 200, "{}", String::from_utf8_lossy(&good.body));
    let g = good.json();
    let p = g["itm"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p) && g["itc"].as_f64().unwrap().abs() <= 1.0 + 1e-6);
    let words: Vec<&str> = g["words"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["word"].as_str().unwrap())
        .collect();
    assert_eq!(words.join(" "), caption0());
    // The same pair as base64 JSON gets the same answer.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(image(0));
    let j = json!({ "image": format!("data:image/png;base64,{b64}"), "caption": caption0() });
    let r = c
        .request(
            "POST",
            "/match",
            Some("application/json"),
            j.to_string().as_bytes(),
        )
        .unwrap();
    assert_eq!(r.json(), g);
    // A large image (over the pixels decoded on the HTTP worker) is decoded
    // on a blocking thread and answered as well.
    let small = ::image::load_from_memory(&image(0)).unwrap();
    let large = small.resize_exact(320, 320, ::image::imageops::FilterType::Nearest);
    let mut png = std::io::Cursor::new(Vec::new());
    large.write_to(&mut png, ::image::ImageFormat::Png).unwrap();
    let r = post_match(&mut c, png.get_ref(), &caption0());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!((0.0..=1.0).contains(&r.json()["itm"].as_f64().unwrap()));

    let hits = c
        .request(
            "POST",
            "/search",
            Some("application/json"),
            json!({ "query": caption0(), "k": 5 })
                .to_string()
                .as_bytes(),
        )
        .unwrap()
        .json();
    let hits = hits["hits"].as_array().unwrap().clone();
    assert_eq!(hits.len(), 5);
    let thumb = c
        .request("GET", hits[0]["thumb"].as_str().unwrap(), None, b"")
        .unwrap();
    assert_eq!((thumb.status, &thumb.body[1..4]), (200, &b"PNG"[..]));

    // Bad requests (each on a new connection, as a server may close one
    // after refusing a body it did not read), each followed by a good one.
    drop(c);
    let check = |r: load::Response, status: u16, says: &str| {
        assert_refused(&r, status, says);
        let again = post_match(&mut s.client(), &image(1), "a shape");
        assert_eq!(
            again.status, 200,
            "the server stopped serving after `{says}`"
        );
    };
    let r = post_match(
        &mut s.client(),
        b"these bytes are not an image at all",
        "a shape",
    );
    check(r, 400, "not a usable image");
    let words = vec!["word"; 10_000].join(" ");
    check(
        post_match(&mut s.client(), &image(0), &words),
        413,
        "data.max_caption_bytes",
    );
    let wrong = s
        .client()
        .request("POST", "/match", Some("application/json"), b"{\"img\": 1}")
        .unwrap();
    check(wrong, 400, "unknown field `img`");
    let broken = s
        .client()
        .request("POST", "/match", Some("application/json"), b"{\"image\": ")
        .unwrap();
    check(broken, 400, "not the expected JSON");
    let text = s
        .client()
        .request("POST", "/match", Some("text/plain"), b"hi")
        .unwrap();
    check(text, 415, "multipart/form-data");
    let (kind, one_field) = load::multipart(&image(0), "x");
    let cut = &one_field[..one_field.len() / 2];
    let r = Client::connect(s.addr)
        .unwrap()
        .request("POST", "/match", Some(&kind), cut);
    if let Ok(r) = r {
        assert!((400..500).contains(&r.status), "a cut form: {}", r.status);
    }
    check(
        post_match(&mut s.client(), &image(0), "   "),
        400,
        "`caption` is empty",
    );
    let q = json!({ "query": "a shape", "k": 0 }).to_string();
    let r = s
        .client()
        .request("POST", "/search", Some("application/json"), q.as_bytes());
    check(r.unwrap(), 400, "`k` is 0");
    check(
        s.client().request("GET", "/thumb/16", None, b"").unwrap(),
        404,
        "no image `16`",
    );
    // 50 MB: written by one thread while this one reads the answer, which
    // comes from the declared length before the body is read.
    let big = vec![7u8; 50 << 20];
    let (kind, body) = load::multipart(&big, "a shape");
    let r = send_while_reading(s.addr, &kind, &body);
    check(r, 413, "data.max_image_bytes");
    assert!(s.log().lines().all(|l| !l.contains("panicked")));
}

/// POST `body` to `/match` from a writer thread, reading the response here
/// (a server may answer before it has read the whole body).
fn send_while_reading(addr: SocketAddr, kind: &str, body: &[u8]) -> load::Response {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let head = format!(
        "POST /match HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let mut writer = stream.try_clone().unwrap();
    let body = body.to_vec();
    let sending = std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes());
        let _ = writer.write_all(&body);
    });
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let _ = sending.join();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .as_bytes()
        .to_vec();
    load::Response { status, body }
}

/// The page's `String(x)` of a number of the API's JSON is `x` itself: the
/// same double to within one unit in the last place, because serde_json
/// (without its `float_roundtrip` feature) parses floats of 17 significant
/// digits to the nearest double or one next to it, while `str::parse` and
/// the browser round correctly.
fn same_f64(shown: &str, api: f64) -> bool {
    let Ok(x) = shown.parse::<f64>() else {
        return false;
    };
    x == api || x.to_bits().abs_diff(api.to_bits()) == 1
}

#[test]
fn the_page_in_a_headless_chromium_shows_match_and_search() {
    let bin = match cdp::find_chromium() {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    };
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let f = fixture();
    let index = f.index.display().to_string();
    let s = Server::start(&["--addr", "127.0.0.1:0", "--index", &index]);
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve");
    std::fs::create_dir_all(&out).unwrap();
    let browser = cdp::Browser::launch(&bin, &scratch("serve-chromium"));
    let mut page = browser.page();
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({ "width": 1100, "height": 720, "deviceScaleFactor": 1, "mobile": false }),
    )
    .unwrap();
    page.call(
        "Page.navigate",
        json!({ "url": format!("http://{}/", s.addr) }),
    )
    .unwrap();
    page.wait_for(
        "document.body && document.body.dataset.ready === '1'",
        "the model",
    );
    let shown_model = page.eval("document.getElementById('model').textContent");
    assert!(
        shown_model.as_str().unwrap().contains("step 4"),
        "{shown_model}"
    );

    // Pick the image through the file input, type the caption, submit.
    let png = f.heldout.join("0000.png");
    let input = page.node("#file");
    page.call(
        "DOM.setFileInputFiles",
        json!({ "files": [png.display().to_string()], "nodeId": input }),
    )
    .unwrap();
    page.wait_for("!document.getElementById('preview').hidden", "the preview");
    let caption = caption0().replace("blue", "red");
    page.eval("document.getElementById('caption').focus()");
    page.call("Input.insertText", json!({ "text": caption }))
        .unwrap();
    page.eval("document.getElementById('match-btn').click()");
    page.wait_for("document.body.dataset.matched === '1'", "a match result");
    let dom = page.eval(
        "JSON.stringify({ shown: document.getElementById('itm').textContent, \
           value: document.getElementById('itm').dataset.value, \
           words: [...document.querySelectorAll('#words .word')].map(w => ({ \
             text: w.textContent, mismatch: w.dataset.mismatch, \
             shade: getComputedStyle(w).backgroundColor })) })",
    );
    let dom: Value = serde_json::from_str(dom.as_str().unwrap()).unwrap();
    let api = post_match(&mut s.client(), &std::fs::read(&png).unwrap(), &caption).json();
    let itm = api["itm"].as_f64().unwrap();
    assert_eq!(dom["shown"], json!(format!("{itm:.4}")));
    assert!(
        same_f64(dom["value"].as_str().unwrap(), itm),
        "{dom} vs {api}"
    );
    let (shown, want) = (
        dom["words"].as_array().unwrap(),
        api["words"].as_array().unwrap(),
    );
    assert_eq!(shown.len(), want.len());
    assert_eq!(shown.len(), caption.split_whitespace().count());
    for (s, w) in shown.iter().zip(want) {
        assert_eq!(s["text"], w["word"]);
        let p = w["mismatch"].as_f64().unwrap();
        assert!(same_f64(s["mismatch"].as_str().unwrap(), p), "{s} vs {w}");
        // rgba(214, 39, 40, ALPHA) with ALPHA the mismatch probability.
        let shade = s["shade"].as_str().unwrap();
        let alpha: f64 = shade
            .strip_prefix("rgba(214, 39, 40, ")
            .and_then(|a| a.strip_suffix(')'))
            .unwrap_or_else(|| panic!("word `{}` has shade {shade}", s["text"]))
            .parse()
            .unwrap();
        assert!((alpha - p).abs() <= 1.0 / 255.0, "{shade} for {p}");
    }

    // A text query shows the index's top images, loaded.
    page.eval(&format!(
        "document.getElementById('query').value = {}; \
         document.getElementById('k').value = '8'; \
         document.getElementById('search-btn').click()",
        json!(caption0())
    ));
    page.wait_for("document.body.dataset.searched === '8'", "8 search hits");
    page.wait_for(
        "[...document.querySelectorAll('#hits img')].every(i => i.complete && i.naturalWidth === 96)",
        "the thumbnails",
    );
    let shot = page.screenshot();
    assert_eq!(&shot[1..4], b"PNG");
    std::fs::write(out.join("page.png"), &shot).unwrap();
    eprintln!("screenshot: {}", out.join("page.png").display());
}

/// The server's resident memory, kB.
fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `(batches, requests)` the server has run, from `/health`.
fn served(addr: SocketAddr) -> (u64, u64) {
    let h = Client::connect(addr)
        .unwrap()
        .request("GET", "/health", None, b"")
        .unwrap()
        .json();
    let n = |k: &str| h["served"][k].as_u64().unwrap();
    (n("batches"), n("requests"))
}

/// 1, 8 and 32 clients, a fixed number of requests each: no errors, the
/// 32 concurrent clients' requests answered in shared forwards, and the
/// server's memory flat. The latencies are printed; bench/SERVE.md has the
/// measured p50/p99 (`examples/serve_bench.rs`), since a timed assertion
/// would fail on a busy machine for reasons of its own.
#[test]
fn load_at_1_8_and_32_clients_has_no_errors_shared_forwards_and_flat_memory() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let s = Server::start(&["--addr", "127.0.0.1:0", "--batch-window-ms", "20"]);
    let (kind, body) = load::multipart(&image(2), &caption0());
    let warm = load::run(s.addr, 32, 4, "/match", &kind, &body);
    assert_eq!(warm.errors, 0, "{:?}", warm.first_error);
    // RSS sampled through the measured run.
    let pid = s.child.id();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (runs, samples, batches) = std::thread::scope(|sc| {
        let sampler = sc.spawn(|| {
            let mut v = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                v.push(rss_kb(pid));
                std::thread::sleep(Duration::from_millis(10));
            }
            v
        });
        let mut batches = Vec::new();
        let mut runs = Vec::new();
        for (clients, each) in [(1, 64), (8, 16), (32, 8)] {
            let before = served(s.addr);
            runs.push(load::run(s.addr, clients, each, "/match", &kind, &body));
            let after = served(s.addr);
            batches.push((after.0 - before.0, after.1 - before.1));
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (runs, sampler.join().unwrap(), batches)
    });
    for (r, (b, n)) in runs.iter().zip(&batches) {
        assert_eq!(r.errors, 0, "{} clients: {:?}", r.clients, r.first_error);
        assert_eq!(*n as usize, r.latencies.len());
        eprintln!(
            "{} clients: p50 {:?}, p99 {:?}, {:.0} requests/s, {:.1} requests per forward",
            r.clients,
            r.percentile(50.0),
            r.percentile(99.0),
            r.requests_per_s(),
            *n as f64 / *b as f64
        );
    }
    // One client: one request per forward. 32 clients: shared forwards.
    assert_eq!(batches[0].0, batches[0].1);
    let (b, n) = batches[2];
    assert!(
        n >= 4 * b,
        "32 clients' {n} requests took {b} forwards: not batched"
    );
    let third = samples.len() / 3;
    assert!(third >= 3, "too few RSS samples: {samples:?}");
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len() as f64;
    let (first, last) = (
        mean(&samples[..third]),
        mean(&samples[samples.len() - third..]),
    );
    eprintln!("RSS {first:.0} kB over the first third, {last:.0} kB over the last");
    assert!(
        (last - first).abs() <= 0.05 * first,
        "RSS {first:.0} kB over the first third, {last:.0} kB over the last"
    );
}

#[test]
fn sigterm_drains_requests_in_flight_and_exits_0() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Server::start(&["--addr", "127.0.0.1:0"]);
    let addr = s.addr;
    // Requests in flight when the signal comes: headers and half the body
    // sent, the rest after it.
    let (signalled_tx, signalled_rx) = std::sync::mpsc::channel::<()>();
    let signalled = std::sync::Arc::new(Mutex::new(signalled_rx));
    let clients: Vec<_> = (0..4)
        .map(|n| {
            let signalled = signalled.clone();
            std::thread::spawn(move || {
                let (kind, body) = load::multipart(&image(n), "a shape");
                let mut stream = std::net::TcpStream::connect(addr).unwrap();
                let head = format!(
                    "POST /match HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {kind}\r\n\
                     Content-Length: {}\r\n\r\n",
                    body.len()
                );
                stream.write_all(head.as_bytes()).unwrap();
                stream.write_all(&body[..body.len() / 2]).unwrap();
                let _ = signalled.lock().unwrap().recv();
                stream.write_all(&body[body.len() / 2..]).unwrap();
                let mut raw = Vec::new();
                let _ = stream.read_to_end(&mut raw);
                String::from_utf8_lossy(&raw).to_string()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let term = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..4 {
        signalled_tx.send(()).unwrap();
    }
    for c in clients {
        let r = c.join().unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("\"itm\""), "{r}");
    }
    let t = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "still running");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{}", s.log());
    assert!(s.log().contains("stop requested"));
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still listening"
    );
}

#[test]
fn beyond_loopback_it_warns_of_no_authentication() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let s = Server::start(&["--addr", "0.0.0.0:0"]);
    let loopback = SocketAddr::from(([127, 0, 0, 1], s.addr.port()));
    let r = Client::connect(loopback)
        .unwrap()
        .request("GET", "/health", None, b"")
        .unwrap();
    assert_eq!(r.status, 200);
    let log = s.log();
    assert!(log.contains("no authentication"), "{log}");
}
