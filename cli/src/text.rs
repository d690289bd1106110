//! Printing payloads and tables.

use std::fmt::Write as _;

/// A payload as one printable line: valid UTF-8 is shown as is, every byte that is not valid
/// UTF-8 as `\xNN`, and control characters, invisible format characters (bidi overrides and
/// isolates, zero-width spaces and joiners, BOM, soft hyphen) and backslashes escaped, so one
/// message is always exactly one line, a payload cannot reorder or hide text on the operator's
/// terminal, and different payloads never print the same.
pub fn escape_payload(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() || is_invisible_format(c) => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// Format characters (Unicode `Cf`) that change how the text around them is shown without
/// showing themselves: bidi marks, embeddings, overrides and isolates, zero-width characters,
/// the BOM and the soft hyphen.
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00ad}'
            | '\u{061c}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{feff}'
    )
}

/// Renders rows as left-aligned columns under a header, two spaces apart, each line indented
/// by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::from(" ");
        for (i, cell) in cells.enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            let _ = write!(l, " {cell:<w$} ");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, &mut header.iter().copied());
    for row in rows {
        line(&mut out, &mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_passes_and_bad_bytes_are_escaped() {
        assert_eq!(escape_payload(b"hello"), "hello");
        assert_eq!(escape_payload("prix 5€".as_bytes()), "prix 5€");
        assert_eq!(escape_payload(b"a\xffb\x00"), "a\\xffb\\u{0}");
        assert_eq!(escape_payload(b"two\nlines\\"), "two\\nlines\\\\");
    }

    #[test]
    fn invisible_and_reordering_characters_are_escaped() {
        // "Trojan source": a right-to-left override would show `evil` as `live`.
        assert_eq!(
            escape_payload("a\u{202e}live\u{202c}b".as_bytes()),
            "a\\u{202e}live\\u{202c}b"
        );
        assert_eq!(
            escape_payload("x\u{200b}y\u{feff}\u{2066}z".as_bytes()),
            "x\\u{200b}y\\u{feff}\\u{2066}z"
        );
        assert_eq!(escape_payload("ä€→".as_bytes()), "ä€→");
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["bus", "n"],
            &[
                vec!["marketdata".into(), "1".into()],
                vec!["main".into(), "22".into()],
            ],
        );
        assert_eq!(t, "  bus         n\n  marketdata  1\n  main        22\n");
    }
}
