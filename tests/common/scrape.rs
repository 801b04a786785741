//! `GET /metrics` for tests: the scrape as text, one sample's value, and how
//! much a sample moved between two scrapes.

/// The scrape as text (checks the status and the exposition content type).
pub async fn scrape(base: &str) -> String {
    let resp = super::client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(resp.status().as_u16(), 200);
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    resp.text().await.expect("body")
}

/// The value of the sample `name` whose labels include every one of `labels`
/// (0 when absent: a counter not yet touched).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(key, _)| {
            let (n, rest) = key.split_once('{').unwrap_or((key, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v.parse::<f64>().expect("sample value"))
        .sum()
}

/// How much `name` (with `labels`) moved between two scrapes.
pub fn moved(before: &str, after: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(after, name, labels) - sample(before, name, labels)
}
