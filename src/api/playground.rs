//! The playground page at `/`: static HTML, JavaScript and CSS compiled into the binary
//! (`src/api/playground/`), which call the public API from the browser. The page itself is open
//! (it holds no data); the API calls it makes carry the key the user types in.

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// The page and its assets: path, content type, body.
const ASSETS: [(&str, &str, &str); 3] = [
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("playground/index.html"),
    ),
    (
        "/playground/app.js",
        "text/javascript; charset=utf-8",
        include_str!("playground/app.js"),
    ),
    (
        "/playground/style.css",
        "text/css; charset=utf-8",
        include_str!("playground/style.css"),
    ),
];

/// Whether `path` is the page or one of its assets (open even when API keys are configured).
pub fn is_page(path: &str) -> bool {
    ASSETS.iter().any(|(p, _, _)| *p == path)
}

/// The page's routes, to merge into the application's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    ASSETS
        .iter()
        .fold(Router::new(), |router, &(path, content_type, body)| {
            router.route(path, get(move || asset(content_type, body)))
        })
}

async fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")],
        body,
    )
}
