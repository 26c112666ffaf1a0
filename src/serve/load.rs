//! A load generator for `vlmatch serve`, shared by its load test
//! (`tests/serve.rs`) and its benchmark (`examples/serve_bench.rs`): a
//! small HTTP/1.1 client over one keep-alive connection, and clients on
//! threads sending a fixed number of requests each, every latency kept.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A response: its status and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// One keep-alive connection.
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    addr: SocketAddr,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Client {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            addr,
        })
    }

    /// Send a request and read its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> std::io::Result<Response> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        if let Some(t) = content_type {
            head += &format!("Content-Type: {t}\r\n");
        }
        head += "\r\n";
        self.writer.write_all(head.as_bytes())?;
        self.writer.write_all(body)?;
        self.writer.flush()?;
        self.read_response()
    }

    fn read_response(&mut self) -> std::io::Result<Response> {
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("not an HTTP status line: {line:?}")))?;
        let (mut length, mut chunked) = (None, false);
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(bad("connection closed in the headers".into()));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    length = v.parse::<usize>().ok();
                } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
                let mut chunk = vec![0; n + 2];
                self.reader.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            self.reader.read_exact(&mut body)?;
        } else {
            self.reader.read_to_end(&mut body)?;
        }
        Ok(Response { status, body })
    }
}

/// A `multipart/form-data` body with an `image` file and a `caption`:
/// `(content type, body)`.
pub fn multipart(image: &[u8], caption: &str) -> (String, Vec<u8>) {
    let boundary = "vlmatch-load-7d3f9a";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; \
             filename=\"image.png\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(image);
    body.extend_from_slice(
        format!(
            "\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"caption\"\r\n\r\n\
             {caption}\r\n--{boundary}--\r\n"
        )
        .as_bytes(),
    );
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// What a load run measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub clients: usize,
    /// Every request's latency, sorted.
    pub latencies: Vec<Duration>,
    /// Requests that failed (not 200, or a broken connection), with the
    /// first failure's description.
    pub errors: usize,
    pub first_error: Option<String>,
    pub wall: Duration,
}

impl LoadResult {
    /// The `p`-th percentile latency (nearest rank), `p` in 0..=100.
    pub fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
    pub fn requests_per_s(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }
}

/// Nearest-rank percentile of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `clients` connections sending `requests` POSTs of `body` to `path`
/// each, all starting together.
pub fn run(
    addr: SocketAddr,
    clients: usize,
    requests: usize,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> LoadResult {
    let start = std::sync::Barrier::new(clients + 1);
    let t0 = std::sync::Mutex::new(None::<Instant>);
    let results: Vec<(Vec<Duration>, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| {
                    let (mut lat, mut errs) = (Vec::with_capacity(requests), Vec::new());
                    let mut client = Client::connect(addr).map_err(|e| e.to_string());
                    start.wait();
                    for _ in 0..requests {
                        let t = Instant::now();
                        let r = match &mut client {
                            Ok(c) => c
                                .request("POST", path, Some(content_type), body)
                                .map_err(|e| e.to_string()),
                            Err(e) => Err(e.clone()),
                        };
                        match r {
                            Ok(resp) if resp.status == 200 => lat.push(t.elapsed()),
                            Ok(resp) => errs.push(format!(
                                "HTTP {}: {}",
                                resp.status,
                                String::from_utf8_lossy(&resp.body)
                            )),
                            Err(e) => {
                                errs.push(e);
                                client = Client::connect(addr).map_err(|e| e.to_string());
                            }
                        }
                    }
                    (lat, errs)
                })
            })
            .collect();
        start.wait();
        *t0.lock().expect("start time") = Some(Instant::now());
        handles
            .into_iter()
            .map(|h| h.join().expect("a load client panicked"))
            .collect()
    });
    let wall = t0
        .lock()
        .expect("start time")
        .map_or(Duration::ZERO, |t| t.elapsed());
    let mut latencies: Vec<Duration> = results.iter().flat_map(|r| r.0.clone()).collect();
    latencies.sort();
    let errors: Vec<&String> = results.iter().flat_map(|r| &r.1).collect();
    LoadResult {
        clients,
        latencies,
        errors: errors.len(),
        first_error: errors.first().map(|e| e.to_string()),
        wall,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&d, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&d, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&d, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&d, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
