//! Test helpers shared by the property tests of the file parsers (config, keyring, policy).

use proptest::{prelude::*, sample::Index};

/// One random edit of a text file: what a careless or hostile hand does to it.
#[derive(Debug, Clone)]
pub(crate) enum Edit {
    /// One character replaced.
    Replace(Index, char),
    /// One line removed.
    RemoveLine(Index),
    /// Cut at a character.
    Truncate(Index),
}

/// Edits, mostly replacements.
pub(crate) fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (
            any::<Index>(),
            prop_oneof![any::<char>(), proptest::char::range(' ', '~'), Just('\n')],
        )
            .prop_map(|(i, c)| Edit::Replace(i, c)),
        2 => any::<Index>().prop_map(Edit::RemoveLine),
        1 => any::<Index>().prop_map(Edit::Truncate),
    ]
}

/// Applies `edits` to `text`, at char (or line) positions.
pub(crate) fn apply_edits(text: &str, edits: &[Edit]) -> String {
    let mut text = text.to_owned();
    for e in edits {
        let mut chars: Vec<char> = text.chars().collect();
        match e {
            Edit::Replace(i, c) if !chars.is_empty() => {
                let at = i.index(chars.len());
                chars[at] = *c;
                text = chars.into_iter().collect();
            }
            Edit::Replace(..) => {}
            Edit::RemoveLine(i) => {
                let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
                if !lines.is_empty() {
                    lines.remove(i.index(lines.len()));
                }
                text = lines.concat();
            }
            Edit::Truncate(i) => {
                text = chars[..i.index(chars.len() + 1)].iter().collect();
            }
        }
    }
    text
}
