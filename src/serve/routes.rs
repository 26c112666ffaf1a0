//! The HTTP side of `vlmatch serve`: the page and its two static files, and
//! the JSON API. Requests are checked here against the run's `[data]`
//! limits and decoded (a small image on the HTTP worker, a large one on
//! tokio's blocking threads); the model thread
//! ([`super::batcher`]) sees only valid pixels and captions. Every refusal
//! is a 4xx with `{"error": "..."}`.

use super::batcher::{Job, MatchResult, ModelInfo, Pending, SearchHit};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

const PAGE: &str = include_str!("../../assets/serve/index.html");
const SCRIPT: &str = include_str!("../../assets/serve/app.js");
const STYLE: &str = include_str!("../../assets/serve/style.css");

/// Thumbnails are this many pixels square.
pub const THUMB: usize = 96;
/// At most this many results per `/search`.
pub const MAX_K: usize = 100;
/// Thumbnails kept in memory before the cache starts over.
const THUMB_CACHE: usize = 1024;

#[derive(Clone)]
pub struct AppState {
    pub jobs: SyncSender<Job>,
    pub info: Arc<ModelInfo>,
    thumbs: Arc<Mutex<HashMap<usize, Bytes>>>,
}

impl AppState {
    pub fn new(jobs: SyncSender<Job>, info: Arc<ModelInfo>) -> AppState {
        AppState {
            jobs,
            info,
            thumbs: Arc::default(),
        }
    }
}

/// A refused or failed request: its status and message.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// The largest request body: an image of `data.max_image_bytes` in base64
/// plus a caption of `data.max_caption_bytes` with every byte escaped.
pub fn body_limit(data: &vlmatch_registry::config::DataConfig) -> usize {
    let image = usize::try_from(data.max_image_bytes).unwrap_or(usize::MAX / 2);
    image
        .div_ceil(3)
        .saturating_mul(4)
        .saturating_add(data.caption_bytes().saturating_mul(6))
        .saturating_add(64 << 10)
}

fn too_large(data: &vlmatch_registry::config::DataConfig, what: String) -> ApiError {
    ApiError(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "{what}: over this server's limits (data.max_image_bytes = {}, \
             data.max_caption_bytes = {}; set them with --set when starting it)",
            data.max_image_bytes,
            data.caption_bytes()
        ),
    )
}

pub fn router(state: AppState) -> Router {
    let limit = body_limit(&state.info.data);
    Router::new()
        .route(
            "/",
            get(|| async { static_file(PAGE, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { static_file(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/style.css",
            get(|| async { static_file(STYLE, "text/css; charset=utf-8") }),
        )
        .route("/health", get(health))
        .route("/match", post(match_pair))
        .route("/search", post(search))
        .route("/thumb/{row}", get(thumb))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

fn static_file(text: &'static str, kind: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], text).into_response()
}

async fn health(State(st): State<AppState>) -> Json<serde_json::Value> {
    let i = &st.info;
    Json(serde_json::json!({
        "status": "ok",
        "run": i.run.display().to_string(),
        "step": i.step,
        "fingerprint": i.fingerprint,
        "discriminator": i.discriminator,
        "index": i.index.as_ref().map(|x| serde_json::json!({
            "dir": x.dir.display().to_string(),
            "images": x.images.len(),
        })),
        "batching": {
            "window_ms": i.batching.window.as_secs_f64() * 1e3,
            "max_batch": i.batching.max_batch,
        },
        "served": {
            "batches": i.batches.load(Ordering::SeqCst),
            "requests": i.jobs.load(Ordering::SeqCst),
        },
    }))
}

/// `/match` as JSON: the image as base64 (or a `data:` URL) and a caption.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchJson {
    image: String,
    caption: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchJson {
    query: String,
    #[serde(default = "default_k")]
    k: usize,
}

fn default_k() -> usize {
    8
}

/// Refuse a body whose declared length is over the limit before reading it.
fn check_length(headers: &HeaderMap, st: &AppState) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > body_limit(&st.info.data) as u64 => Err(too_large(
            &st.info.data,
            format!("a request body of {n} bytes"),
        )),
        _ => Ok(()),
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// The body as bytes, a body over the limit refused as 413.
async fn body_bytes(req: Request, st: &AppState) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, st).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(&st.info.data, "the request body".into())
        } else {
            ApiError(e.status(), format!("cannot read the request body: {e}"))
        }
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], shape: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("not the expected JSON ({shape}): {e}")))
}

/// The image bytes and caption of a `/match` request, multipart
/// (`image` file, `caption` text) or JSON.
async fn match_input(req: Request, st: &AppState) -> Result<(Vec<u8>, String), ApiError> {
    let kind = content_type(req.headers());
    if kind.starts_with("multipart/form-data") {
        let mut form = Multipart::from_request(req, st)
            .await
            .map_err(|e| ApiError(e.status(), e.body_text()))?;
        let (mut image, mut caption) = (None, None);
        let too_big = |e: axum::extract::multipart::MultipartError| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large(&st.info.data, "the request body".into())
            } else {
                ApiError(e.status(), e.body_text())
            }
        };
        while let Some(field) = form.next_field().await.map_err(too_big)? {
            match field.name().unwrap_or("") {
                "image" => image = Some(field.bytes().await.map_err(too_big)?.to_vec()),
                "caption" => caption = Some(field.text().await.map_err(too_big)?),
                other => {
                    return Err(bad(format!(
                        "unknown form field `{other}`: expected `image` (a file) and `caption`"
                    )))
                }
            }
        }
        match (image, caption) {
            (Some(i), Some(c)) => Ok((i, c)),
            _ => Err(bad(
                "the form needs two fields: `image` (a JPEG or PNG file) and `caption`",
            )),
        }
    } else if kind.starts_with("application/json") {
        let body = body_bytes(req, st).await?;
        let m: MatchJson = parse_json(&body, r#"{"image": BASE64, "caption": TEXT}"#)?;
        let b64 = match m.image.split_once(";base64,") {
            Some((head, data)) if head.starts_with("data:") => data,
            _ => m.image.as_str(),
        };
        let image = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| bad(format!("`image` is not base64: {e}")))?;
        Ok((image, m.caption))
    } else {
        Err(ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "content type `{kind}`: send multipart/form-data (image, caption) or \
                 application/json"
            ),
        ))
    }
}

/// A caption within `data.max_caption_bytes`, not blank.
fn check_caption(text: &str, st: &AppState, what: &str) -> Result<(), ApiError> {
    if text.trim().is_empty() {
        return Err(bad(format!("`{what}` is empty")));
    }
    let max = st.info.data.caption_bytes();
    if text.len() > max {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "`{what}` is {} bytes, over data.max_caption_bytes ({max})",
                text.len()
            ),
        ));
    }
    Ok(())
}

/// Hand a job to the model thread (no longer `pending` once queued) and
/// wait for its answer.
async fn ask<T>(
    st: &AppState,
    pending: Pending,
    job: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, String>>) -> Job,
) -> Result<T, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sent = st.jobs.try_send(job(tx));
    drop(pending);
    match sent {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy: too many requests waiting for the model; try again".into(),
            ))
        }
        Err(TrySendError::Disconnected(_)) => {
            return Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "the model thread has stopped".into(),
            ))
        }
    }
    match rx.await {
        Ok(Ok(x)) => Ok(x),
        Ok(Err(e)) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e)),
        Err(_) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the model failed on this batch (see the server's log)".into(),
        )),
    }
}

/// Images of at most this many pixels (by their header) are decoded on the
/// HTTP worker; larger ones on tokio's blocking threads.
const INLINE_PIXELS: u64 = 256 * 256;

async fn match_pair(
    State(st): State<AppState>,
    req: Request,
) -> Result<Json<MatchResult>, ApiError> {
    check_length(req.headers(), &st)?;
    let pending = Pending::start(&st.info);
    let (image, caption) = match_input(req, &st).await?;
    let data = &st.info.data;
    if image.len() as u64 > data.max_image_bytes {
        return Err(too_large(
            data,
            format!("an image of {} bytes", image.len()),
        ));
    }
    check_caption(&caption, &st, "caption")?;
    let (size, mean, std) = (data.image_size as usize, data.mean, data.std);
    // A small image decodes in less time than handing it to a blocking
    // thread takes (tens of microseconds and two context switches); a
    // large one would hold up this worker's other connections.
    let small = crate::data::image::header_pixels(&image).is_some_and(|n| n <= INLINE_PIXELS);
    let decode = move || {
        crate::data::loader::decode_bytes_resized(
            &image,
            std::path::Path::new("image"),
            "the request",
            size,
        )
        .map(|rgb| crate::data::normalize(&rgb, mean, std))
    };
    let pixels = if small {
        // A decoder panic fails this request (500), as it does on a
        // blocking thread, not the connection's task.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)).map_err(|p| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "the image decoder panicked on this image: {}",
                    crate::panics::payload_text(p.as_ref())
                ),
            )
        })?
    } else {
        tokio::task::spawn_blocking(decode)
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    }
    .map_err(|e| bad(format!("not a usable image: {e}")))?;
    let result = ask(&st, pending, |reply| Job::Match {
        pixels,
        caption,
        reply,
    })
    .await?;
    Ok(Json(result))
}

async fn search(
    State(st): State<AppState>,
    req: Request,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_length(req.headers(), &st)?;
    let Some(index) = &st.info.index else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "this server has no index to search: start it with --index DIR \
             (an index made by `vlmatch embed`)"
                .into(),
        ));
    };
    if !content_type(req.headers()).starts_with("application/json") {
        return Err(ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            r#"send application/json: {"query": TEXT, "k": N}"#.into(),
        ));
    }
    let pending = Pending::start(&st.info);
    let body = body_bytes(req, &st).await?;
    let s: SearchJson = parse_json(&body, r#"{"query": TEXT, "k": N}"#)?;
    check_caption(&s.query, &st, "query")?;
    if s.k == 0 || s.k > MAX_K {
        return Err(bad(format!("`k` is {}: expected 1 to {MAX_K}", s.k)));
    }
    let k = s.k.min(index.images.len());
    let query = s.query.clone();
    let hits: Vec<SearchHit> = ask(&st, pending, |reply| Job::Search { query, k, reply }).await?;
    Ok(Json(serde_json::json!({ "query": s.query, "hits": hits })))
}

/// `/thumb/ROW`: index image `ROW` as a PNG, `THUMB` pixels square.
async fn thumb(State(st): State<AppState>, Path(row): Path<String>) -> Result<Response, ApiError> {
    let Some(index) = &st.info.index else {
        return Err(ApiError(StatusCode::NOT_FOUND, "no index loaded".into()));
    };
    let row: usize = row
        .parse()
        .ok()
        .filter(|&r| r < index.images.len())
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!(
                    "no image `{row}`: rows are 0 to {}",
                    index.images.len().saturating_sub(1)
                ),
            )
        })?;
    let cached = st.thumbs.lock().expect("thumb cache").get(&row).cloned();
    let png = match cached {
        Some(png) => png,
        None => {
            let info = st.info.clone();
            let png = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
                let ds = &info.index.as_ref().expect("index").dataset;
                let rgb = ds.load_rgb(row, THUMB).map_err(|e| e.to_string())?;
                let mut out = Vec::new();
                image::ImageEncoder::write_image(
                    image::codecs::png::PngEncoder::new(&mut out),
                    &rgb,
                    THUMB as u32,
                    THUMB as u32,
                    image::ExtendedColorType::Rgb8,
                )
                .map_err(|e| e.to_string())?;
                Ok(out)
            })
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
            let png = Bytes::from(png);
            let mut cache = st.thumbs.lock().expect("thumb cache");
            if cache.len() >= THUMB_CACHE {
                cache.clear();
            }
            cache.insert(row, png.clone());
            png
        }
    };
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}
