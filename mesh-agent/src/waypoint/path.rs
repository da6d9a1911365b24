//! Request paths as the waypoint authorizes and routes them: normalized as
//! RFC 3986 says (percent-encoded unreserved characters decoded, dot
//! segments removed) and with repeated slashes merged, so that `/./admin`,
//! `//admin`, `/%61dmin` and `/x/../admin` are all `/admin` for policy and
//! for routing, and the backend receives that same path. An encoded slash
//! (`%2F`) stays encoded: it is not a separator.

/// The normalized form of `path` (which starts with `/`).
pub fn normalize(path: &str) -> String {
    let decoded = decode_unreserved(path);
    let merged = merge_slashes(&decoded);
    remove_dot_segments(&merged)
}

fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            let c = h * 16 + l;
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                out.push(c);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    // Only ASCII bytes were replaced by ASCII bytes.
    String::from_utf8(out).unwrap_or_else(|_| path.to_owned())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    out
}

/// RFC 3986 section 5.2.4, on a path made of segments.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let ends_with_slash = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    for seg in path.split('/').skip(1) {
        match seg {
            "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::from("/");
    out.push_str(&segments.join("/"));
    if ends_with_slash && !out.ends_with('/') {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn the_ways_around_a_path_rule_all_come_to_the_same_path() {
        for p in [
            "/admin",
            "/./admin",
            "//admin",
            "/%61dmin",
            "/x/../admin",
            "/a/b/../../admin",
        ] {
            assert_eq!(normalize(p), "/admin", "{p}");
        }
        assert_eq!(normalize("/api/"), "/api/");
        assert_eq!(normalize("/a/%2F/b"), "/a/%2F/b");
        assert_eq!(normalize("/../.."), "/");
        assert_eq!(normalize("/a/."), "/a/");
        assert_eq!(normalize("/%7Euser/%zz"), "/~user/%zz");
        assert_eq!(normalize("/caf%C3%A9"), "/caf%C3%A9");
    }
}
