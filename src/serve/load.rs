//! A load generator for `vlmatch serve`, shared by its load test
//! (`tests/serve.rs`) and its benchmark (`examples/serve_bench.rs`): a
//! small HTTP/1.1 client over one keep-alive connection, and clients on
//! one event loop sending a fixed number of requests each, every latency
//! kept.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long a client waits for a response before it gives up.
const TIMEOUT: Duration = Duration::from_secs(120);

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

/// One keep-alive connection, asynchronous: the load generator runs every
/// client on one thread, so that on a small machine the clients take as
/// little CPU from the server as they can.
pub struct Connection {
    stream: BufReader<TcpStream>,
    addr: SocketAddr,
    /// The request being written, reused.
    out: Vec<u8>,
}

impl Connection {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Connection> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Connection {
            stream: BufReader::new(s),
            addr,
            out: Vec::new(),
        })
    }

    /// Send a request and read its response, within [`TIMEOUT`].
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> std::io::Result<Response> {
        use std::io::Write;
        self.out.clear();
        write!(
            self.out,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        )?;
        if let Some(t) = content_type {
            write!(self.out, "Content-Type: {t}\r\n")?;
        }
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(body);
        let exchange = async {
            self.stream.get_mut().write_all(&self.out).await?;
            read_response(&mut self.stream).await
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no response"))?
    }
}

async fn read_response(reader: &mut BufReader<TcpStream>) -> std::io::Result<Response> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("not an HTTP status line: {line:?}")))?;
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
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
            reader.read_line(&mut line).await?;
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        reader.read_exact(&mut body).await?;
    } else {
        reader.read_to_end(&mut body).await?;
    }
    Ok(Response { status, body })
}

/// A single-threaded runtime for the clients.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// One keep-alive connection used from synchronous code (tests): a
/// [`Connection`] on a runtime of its own.
pub struct Client {
    rt: tokio::runtime::Runtime,
    conn: Connection,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let rt = runtime()?;
        let conn = rt.block_on(Connection::connect(addr))?;
        Ok(Client { rt, conn })
    }

    /// Send a request and read its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> std::io::Result<Response> {
        self.rt
            .block_on(self.conn.request(method, path, content_type, body))
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
/// each, all starting together once every one is connected. The clients
/// share one thread (an event loop, as `wrk` runs them), so that the load
/// generator's own threads do not crowd out the server it measures.
pub fn run(
    addr: SocketAddr,
    clients: usize,
    requests: usize,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> LoadResult {
    let failed = |e: std::io::Error| LoadResult {
        clients,
        latencies: Vec::new(),
        errors: clients * requests,
        first_error: Some(e.to_string()),
        wall: Duration::ZERO,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return failed(e),
    };
    rt.block_on(async {
        let mut conns = Vec::with_capacity(clients);
        for _ in 0..clients {
            conns.push(Connection::connect(addr).await.map_err(|e| e.to_string()));
        }
        let t0 = Instant::now();
        let one = |mut conn: std::result::Result<Connection, String>| async move {
            let (mut lat, mut errs) = (Vec::with_capacity(requests), Vec::new());
            for _ in 0..requests {
                let t = Instant::now();
                let r = match &mut conn {
                    Ok(c) => c
                        .request("POST", path, Some(content_type), body)
                        .await
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
                        conn = Connection::connect(addr).await.map_err(|e| e.to_string());
                    }
                }
            }
            (lat, errs)
        };
        let results = join_all(conns.into_iter().map(one).collect()).await;
        let wall = t0.elapsed();
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
    })
}

/// Drive every future to completion on the current task, each polled when
/// woken, and return their outputs in order.
async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).map(Some).collect();
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futures.iter_mut().zip(out.iter_mut()) {
            if let Some(fut) = f {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *o = Some(v);
                        *f = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
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
