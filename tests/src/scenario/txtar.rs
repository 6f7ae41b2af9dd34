//! The txtar container format: a free-form comment (our script) followed by embedded files.
//!
//! Follows `golang.org/x/tools/txtar`: a header line is `-- NAME --`; a file's body is every
//! line up to the next header or the end of the input, so a blank line just before the next
//! header belongs to the body, and a header followed directly by another header (or by the
//! end) is an empty file. A body that does not end in a newline gets one.

/// A parsed txtar archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    /// Everything before the first file header (the scenario script).
    pub comment: String,
    /// The embedded files, in order of appearance.
    pub files: Vec<File>,
}

/// One embedded file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub name: String,
    pub data: String,
}

/// Returns the file name if `line` (without its newline) is a `-- NAME --` header.
fn header_name(line: &str) -> Option<&str> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let inner = line.strip_prefix("-- ")?.strip_suffix(" --")?;
    let name = inner.trim();
    (!name.is_empty()).then_some(name)
}

/// Parses `text` as a txtar archive. Never fails: anything that is not a header is content.
pub fn parse(text: &str) -> Archive {
    let mut comment = String::new();
    let mut files: Vec<File> = Vec::new();
    for line in text.split_inclusive('\n') {
        let bare = line.strip_suffix('\n').unwrap_or(line);
        if let Some(name) = header_name(bare) {
            files.push(File {
                name: name.to_owned(),
                data: String::new(),
            });
            continue;
        }
        let target = match files.last_mut() {
            Some(file) => &mut file.data,
            None => &mut comment,
        };
        target.push_str(line);
    }
    for file in &mut files {
        if !file.data.is_empty() && !file.data.ends_with('\n') {
            file.data.push('\n');
        }
    }
    Archive { comment, files }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_keep_trailing_blank_line_and_empty_files_are_empty() {
        let a = parse(
            "#! --x\n\nhive/start\n\n-- a.yaml --\nkind: A\n\n-- empty.expected --\n-- b --\nlast",
        );
        assert_eq!(a.comment, "#! --x\n\nhive/start\n\n");
        assert_eq!(
            a.files,
            vec![
                File {
                    name: "a.yaml".into(),
                    data: "kind: A\n\n".into()
                },
                File {
                    name: "empty.expected".into(),
                    data: String::new()
                },
                File {
                    name: "b".into(),
                    data: "last\n".into()
                },
            ]
        );
    }

    #[test]
    fn header_at_end_of_input_is_an_empty_file() {
        let a = parse("x\n-- ips-empty.expected --\n");
        assert_eq!(a.files.len(), 1);
        assert_eq!(a.files[0].name, "ips-empty.expected");
        assert_eq!(a.files[0].data, "");
        let a = parse("x\n-- ips-empty.expected --");
        assert_eq!(a.files[0].data, "");
    }

    #[test]
    fn lookalike_lines_are_content() {
        let a = parse("-- a --\n--  --\n-- b\n--x --\n");
        assert_eq!(a.files.len(), 1);
        assert_eq!(a.files[0].data, "--  --\n-- b\n--x --\n");
    }
}
