//! Reading Kubernetes objects out of JSON text: one object, or a
//! `kind: List` as `kubectl get -o json` writes it, with the same
//! dispatch, the same one-pass Pod read and the same warnings as YAML
//! ([`super::yaml`]). A long List's items are parsed in parallel.

use serde::{Deserialize, de::IgnoredAny};
use serde_yaml::Value;

use super::{
    Document,
    pod_parse::Probe,
    yaml::{At, on_threads, parallel_parts},
};

/// What surrounds a List's items, read on its own.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    api_version: Option<String>,
    kind: Option<String>,
    #[allow(dead_code, reason = "only its presence, once, is checked")]
    items: Option<IgnoredAny>,
}

/// A top-level object's `"items": [...]`, as byte ranges: the array
/// (`[` to `]`, inclusive) and each item in it (between its commas).
#[derive(Debug, PartialEq)]
struct Layout {
    array: (usize, usize),
    items: Vec<(usize, usize)>,
}

/// Finds the items of the top-level object's first `"items"` array by
/// following strings and nesting only, without parsing: so that they can
/// be parsed apart, in parallel. Each part found here is then parsed as
/// JSON on its own (the text around the array with `[]` in its place, and
/// every item), so a text that is not JSON is still refused as such. None
/// when the text is not an object with such an array, or not balanced.
fn layout(text: &str) -> Option<Layout> {
    scan(text, true)
}

/// Where the items array of [`layout`] opens (`[`), found by scanning
/// only the text before it.
fn items_open(text: &str) -> Option<usize> {
    scan(text, false).map(|l| l.array.0)
}

/// [`layout`]; or, unless `whole`, only where the array opens.
fn scan(text: &str, whole: bool) -> Option<Layout> {
    let b = text.as_bytes();
    if b.iter().find(|c| !c.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let mut depth = 0usize;
    // The last string seen at depth 1 (where keys are), its end.
    let mut key: Option<(usize, usize)> = None;
    let mut array: Option<usize> = None;
    let mut items = Vec::new();
    let mut item_start = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let end = string_end(b, i)?;
                if depth == 1 {
                    key = Some((i, end));
                }
                i = end;
                continue;
            }
            b'[' if depth == 1 && array.is_none() => {
                let is_items = key.is_some_and(|(from, to)| {
                    &text[from..to] == "\"items\"" && text[to..i].trim_ascii().as_bytes() == b":"
                });
                if is_items {
                    if !whole {
                        return Some(Layout {
                            array: (i, i),
                            items: Vec::new(),
                        });
                    }
                    array = Some(i);
                    item_start = i + 1;
                }
                depth += 1;
            }
            b'{' | b'[' => depth += 1,
            b']' if depth == 2 && array.is_some() => {
                let last = &text[item_start..i];
                if !items.is_empty() || !last.trim_ascii().is_empty() {
                    items.push((item_start, i));
                }
                // The rest is only checked for balance.
                return balanced(&b[i + 1..], 1).then_some(Layout {
                    array: (array?, i + 1),
                    items,
                });
            }
            b'}' | b']' => depth = depth.checked_sub(1)?,
            b',' if depth == 2 && array.is_some() => {
                items.push((item_start, i));
                item_start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Whether `rest` closes `depth` open brackets, with no string left open.
fn balanced(rest: &[u8], mut depth: usize) -> bool {
    let mut i = 0;
    while i < rest.len() {
        match rest[i] {
            b'"' => match string_end(rest, i) {
                Some(end) => {
                    i = end;
                    continue;
                }
                None => return false,
            },
            b'{' | b'[' => depth += 1,
            b'}' | b']' => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            _ => {}
        }
        i += 1;
    }
    depth == 0
}

/// Just past the end of the string that starts at `b[start]` (a quote).
fn string_end(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        let at = i + b.get(i..)?.iter().position(|&c| c == b'"' || c == b'\\')?;
        if b[at] == b'"' {
            return Some(at + 1);
        }
        i = at + 2;
    }
}

/// serde_json's message for an error in `part` (a slice of `text`), at
/// its line and column in `text`.
pub(super) fn located(text: &str, part: &str, e: &serde_json::Error) -> String {
    let offset = part.as_ptr() as usize - text.as_ptr() as usize;
    let message = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = message.strip_suffix(&suffix).unwrap_or(&message);
    if e.line() == 0 {
        return message.to_owned();
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + e.line();
    let column = if e.line() == 1 {
        offset - before.rfind('\n').map_or(0, |n| n + 1) + e.column()
    } else {
        e.column()
    };
    format!("{message} at line {line} column {column}")
}

impl Document {
    /// Every object in a JSON text: one object, or a `kind: List` (whose
    /// items, in a long text, are parsed in parallel). Malformed JSON is
    /// a syntax error naming its line and column; a bad object is a
    /// warning naming it, and the others are used.
    pub fn parse_json(origin: &str, text: &str) -> Document {
        Document::parse_json_in_parts(origin, text, parallel_parts(text.len()))
    }

    /// [`Document::parse_json`] with `parts` parts at most.
    pub(super) fn parse_json_in_parts(origin: &str, text: &str, parts: usize) -> Document {
        let mut doc = Document {
            origin: origin.into(),
            ..Document::default()
        };
        if parts > 1
            && let Some(doc) = Document::json_list_cut(origin, text, parts)
        {
            return doc;
        }
        let Some(layout) = layout(text).filter(|l| is_list(text, l)) else {
            doc.add_json(origin, text, text);
            return doc;
        };
        let groups = groups(&layout.items, parts.max(1));
        let docs: Vec<Document> = if groups.len() <= 1 {
            vec![Document::json_items(origin, text, &layout.items)]
        } else {
            on_threads(&groups, |items| Document::json_items(origin, text, items))
        };
        docs.into_iter().for_each(|part| doc.append(part));
        doc
    }

    /// A pretty-printed List (as kubectl and serde_json write it) read
    /// in `parts` without a scan of the whole text: it is cut where a
    /// line closes an item at the first item's indentation and the next
    /// line opens one (no JSON string holds a line break), and each part
    /// is parsed as a run of items. A part must end exactly where the next
    /// begins, after a comma between items (the first begins right after
    /// the array's `[`, so every cut is then between two items), and the
    /// last at the array's `]`; and the text around the array must be a
    /// `v1` List. None (read the general way) when any of this does not
    /// hold or the text does not parse.
    fn json_list_cut(origin: &str, text: &str, parts: usize) -> Option<Document> {
        let open = items_open(text)?;
        let first = text[open + 1..].find(|c: char| !c.is_ascii_whitespace())? + open + 1;
        let indent = &text[open + 1..first];
        let indent = &indent[indent.rfind('\n')? + 1..];
        if text.as_bytes()[first] != b'{' || !indent.bytes().all(|b| b == b' ' || b == b'\t') {
            return None;
        }
        let close = format!("\n{indent}}},");
        let mut cuts = vec![open + 1];
        for k in 1..parts {
            let mut from = (first + (text.len() - first) * k / parts).max(cuts[cuts.len() - 1]);
            while !text.is_char_boundary(from) {
                from += 1;
            }
            let Some(at) = text.get(from..).and_then(|rest| rest.find(&close)) else {
                break;
            };
            let cut = from + at + close.len();
            let next = text[cut..].trim_start_matches(|c: char| c.is_ascii_whitespace());
            if !next.starts_with('{') {
                return None;
            }
            cuts.push(cut);
        }
        let bounds: Vec<(usize, Option<usize>)> = cuts
            .iter()
            .enumerate()
            .map(|(k, &from)| (from, cuts.get(k + 1).copied()))
            .collect();
        let runs: Vec<Option<(Document, usize)>> = on_threads(&bounds, |&(from, to)| {
            Document::json_run(origin, text, from, to)
        });
        let mut doc = Document {
            origin: origin.into(),
            ..Document::default()
        };
        let mut end = 0;
        for run in runs {
            let (part, to) = run?;
            doc.append(part);
            end = to;
        }
        let layout = Layout {
            array: (open, end),
            items: Vec::new(),
        };
        is_list(text, &layout).then_some(doc)
    }

    /// The items from `from` (where one begins) up to `to`: each parsed
    /// once, and the position just past the comma that ends the run at
    /// `to`; with no `to`, past the array's closing `]`. None when the
    /// text does not read so.
    fn json_run(
        origin: &str,
        text: &str,
        mut from: usize,
        to: Option<usize>,
    ) -> Option<(Document, usize)> {
        let mut doc = Document {
            origin: origin.into(),
            ..Document::default()
        };
        loop {
            let mut values = serde_json::Deserializer::from_str(&text[from..]).into_iter::<Probe>();
            let probe = values.next()?;
            let end = from + values.byte_offset();
            let item = match probe {
                Ok(probe) => {
                    let at = At {
                        origin,
                        text: Some(text),
                        index: None,
                        json: Some(&text[from..end]),
                    };
                    match probe {
                        Probe::Null => {}
                        Probe::Pod(pod) => doc.add_pod(at, pod),
                        Probe::Other(value) => doc.add(at, value),
                    }
                    end
                }
                Err(_) => {
                    // Not a Pod the one-pass way: find its end, then read
                    // it the general way, which says what is wrong.
                    let mut values =
                        serde_json::Deserializer::from_str(&text[from..]).into_iter::<IgnoredAny>();
                    values.next()?.ok()?;
                    let end = from + values.byte_offset();
                    doc.add_json(origin, text, &text[from..end]);
                    end
                }
            };
            let rest = &text[item..];
            let after = item + rest.len()
                - rest
                    .trim_start_matches(|c: char| c.is_ascii_whitespace())
                    .len();
            match (text.as_bytes().get(after), to) {
                (Some(b','), Some(to)) if after + 1 == to => return Some((doc, to)),
                (Some(b','), Some(to)) if after + 1 > to => return None,
                (Some(b','), _) => {
                    let rest = &text[after + 1..];
                    from = after + 1 + rest.len()
                        - rest
                            .trim_start_matches(|c: char| c.is_ascii_whitespace())
                            .len();
                }
                (Some(b']'), None) => return Some((doc, after + 1)),
                _ => return None,
            }
        }
    }

    fn json_items(origin: &str, text: &str, items: &[(usize, usize)]) -> Document {
        let mut doc = Document {
            origin: origin.into(),
            ..Document::default()
        };
        for &(from, to) in items {
            doc.add_json(origin, text, &text[from..to]);
        }
        doc
    }

    /// One JSON value, `part` of `text`: a Pod read the one-pass way,
    /// anything else through the general way.
    fn add_json(&mut self, origin: &str, text: &str, part: &str) {
        let at = At {
            origin,
            text: Some(text),
            index: None,
            json: Some(part),
        };
        let mut de = serde_json::Deserializer::from_str(part);
        let probe = Probe::deserialize(&mut de).and_then(|p| de.end().map(|()| p));
        let value = match probe {
            Ok(Probe::Null) => return,
            Ok(Probe::Pod(pod)) => return self.add_pod(at, pod),
            Ok(Probe::Other(value)) => Ok(value),
            // Read again the general way, which says what is wrong.
            Err(_) => serde_json::from_str::<Value>(part),
        };
        match value {
            Ok(Value::Null) => {}
            Ok(value) => self.add(at, value),
            Err(e) => self.syntax(origin, located(text, part, &e)),
        }
    }
}

/// Whether the text around the array is JSON, and a `v1` `List` with one
/// `items`.
fn is_list(text: &str, layout: &Layout) -> bool {
    let (from, to) = layout.array;
    let head = format!("{}[]{}", &text[..from], &text[to..]);
    serde_json::from_str::<Head>(&head)
        .is_ok_and(|h| h.api_version.as_deref() == Some("v1") && h.kind.as_deref() == Some("List"))
}

/// `items` cut into at most `parts` runs of near equal sizes.
fn groups(items: &[(usize, usize)], parts: usize) -> Vec<&[(usize, usize)]> {
    let total: usize = items.iter().map(|(from, to)| to - from).sum();
    let target = total.div_ceil(parts).max(1);
    let mut groups = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, (from, to)) in items.iter().enumerate() {
        size += to - from;
        if size >= target && groups.len() + 1 < parts {
            groups.push(&items[start..=i]);
            start = i + 1;
            size = 0;
        }
    }
    if start < items.len() {
        groups.push(&items[start..]);
    }
    groups
}

#[cfg(test)]
#[path = "json_tests.rs"]
mod tests;
