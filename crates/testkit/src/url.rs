//! URLs of the test servers: the same server, another database or vhost.
use anyhow::bail;

/// `base` with its path (database or vhost) replaced by the percent-encoded
/// `segment`; the query string is kept.
pub fn with_path(base: &str, segment: &str) -> anyhow::Result<String> {
    let (without_query, query) = match base.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (base, None),
    };
    let Some(scheme_end) = without_query.find("://") else {
        bail!("not a URL (no scheme)");
    };
    let authority_start = scheme_end + 3;
    let authority_end = without_query[authority_start..]
        .find('/')
        .map_or(without_query.len(), |i| authority_start + i);
    let mut url = format!(
        "{}/{}",
        &without_query[..authority_end],
        percent_encode(segment)
    );
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    Ok(url)
}

fn percent_encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
