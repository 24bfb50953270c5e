//! The lexical guard of the semantic cache: two prompts close in embedding
//! space may still ask different things. A question and its negation score
//! 0.83 to 0.9997 with common sentence embedders (zilliztech/GPTCache #694),
//! and so do prompts that differ only in a number, a name, a quoted string,
//! an opposite ("advantages" / "disadvantages") or the asked format. Above
//! the similarity threshold the two prompts must still agree on each of
//! these, or the candidate is refused.
//!
//! The check is cheap (a pass over the words of each prompt) and errs on
//! the side of a miss: a paraphrase it refuses costs one provider call, a
//! wrong answer it lets through costs the user's trust.

use std::collections::BTreeSet;

use super::lexicon::{
    COMMON_STARTERS, DIRECTIONAL, ENGLISH, FORMATS, FUNCTION_WORDS, NEGATIONS, NUMBER_WORDS,
    OPPOSITES, OTHER_LANGUAGES,
};

/// What a prompt says that must not change between it and a cached one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    /// Lower-cased words, for the entity cross-check.
    words: BTreeSet<String>,
    numbers: BTreeSet<String>,
    negated: bool,
    /// Named entities (lower-cased), in order of appearance.
    entities: Vec<String>,
    quoted: BTreeSet<String>,
    formats: BTreeSet<&'static str>,
    /// Words that have an opposite (see [`OPPOSITES`]), stemmed.
    polar: BTreeSet<&'static str>,
    /// A word that orders what it joins ("to", "from", "than", "vs"...).
    directional: bool,
    /// The content words in order (stemmed, function words left out).
    content: Vec<String>,
    /// Common words of English minus those of a few other languages: the
    /// sign says which the prompt is written in (0: cannot tell).
    language: i32,
}

/// Why the guard refused a candidate (also a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Numbers,
    Negation,
    Opposite,
    Entities,
    Quoted,
    Format,
    Language,
    /// The same sentence with one content word swapped ("the chemical
    /// symbol for gold" / "for silver"): another subject.
    Substitution,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Numbers => "numbers",
            Refusal::Negation => "negation",
            Refusal::Opposite => "opposite",
            Refusal::Entities => "entities",
            Refusal::Quoted => "quoted",
            Refusal::Format => "format",
            Refusal::Language => "language",
            Refusal::Substitution => "substitution",
        }
    }
}

/// Checks that `a` and `b` agree on everything the guard looks at.
pub fn check(a: &Features, b: &Features) -> Result<(), Refusal> {
    if a.numbers != b.numbers {
        return Err(Refusal::Numbers);
    }
    if a.negated != b.negated {
        return Err(Refusal::Negation);
    }
    if a.quoted != b.quoted {
        return Err(Refusal::Quoted);
    }
    if a.formats != b.formats {
        return Err(Refusal::Format);
    }
    if a.language.signum() * b.language.signum() < 0 {
        return Err(Refusal::Language);
    }
    for (x, y) in [(a, b), (b, a)] {
        for w in &x.polar {
            let opposite = opposite_of(w);
            if opposite.is_some_and(|o| y.polar.contains(o)) && !y.polar.contains(w) {
                return Err(Refusal::Opposite);
            }
        }
        // Each side's names must appear as words on the other side (a
        // name at the start of a sentence is not recognised as one).
        if x.entities.iter().any(|e| !y.words.contains(e)) {
            return Err(Refusal::Entities);
        }
    }
    if a.content.len() == b.content.len()
        && a.content
            .iter()
            .zip(&b.content)
            .filter(|(x, y)| x != y)
            .count()
            == 1
    {
        return Err(Refusal::Substitution);
    }
    // "from Celsius to Fahrenheit" is not "from Fahrenheit to Celsius".
    if (a.directional || b.directional) && a.entities.len() > 1 && a.entities != b.entities {
        return Err(Refusal::Entities);
    }
    Ok(())
}

fn opposite_of(w: &str) -> Option<&'static str> {
    OPPOSITES.iter().find_map(|&(a, b)| {
        if a == w {
            Some(b)
        } else if b == w {
            Some(a)
        } else {
            None
        }
    })
}

fn polar_word(w: &str) -> Option<&'static str> {
    OPPOSITES
        .iter()
        .find_map(|&(a, b)| [a, b].into_iter().find(|x| *x == w))
}

/// Lower-cases, drops a possessive `'s`, folds the typographic
/// apostrophe, drops apostrophes.
fn fold(word: &str) -> String {
    let word = word
        .strip_suffix("'s")
        .or_else(|| word.strip_suffix("’s"))
        .unwrap_or(word);
    word.chars()
        .filter(|c| *c != '\'' && *c != '’')
        .flat_map(char::to_lowercase)
        .collect()
}

/// A plural or third-person ending dropped: "advantages" is "advantage",
/// "weaknesses" is "weakness", "cities" is "city".
fn stem(w: &str) -> String {
    if w.len() > 4 && w.ends_with("ies") {
        return format!("{}y", &w[..w.len() - 3]);
    }
    if w.len() > 4
        && ["sses", "shes", "ches", "xes", "zes"]
            .iter()
            .any(|e| w.ends_with(e))
    {
        return w[..w.len() - 2].to_string();
    }
    if w.len() > 3 && w.ends_with('s') && !w.ends_with("ss") {
        return w[..w.len() - 1].to_string();
    }
    w.to_string()
}

/// The forms a word may take in [`OPPOSITES`]: itself, its stem, and the
/// base of a comparative or superlative ("hottest" is "hot", "easier" is
/// "easy", "colder" is "cold").
fn base_forms(w: &str) -> Vec<String> {
    let mut out = vec![w.to_string(), stem(w)];
    for suffix in ["est", "er"] {
        let Some(base) = w.strip_suffix(suffix) else {
            continue;
        };
        if base.len() < 2 {
            continue;
        }
        out.push(base.to_string());
        out.push(format!("{base}e"));
        if let Some(b) = base.strip_suffix('i') {
            out.push(format!("{b}y"));
        }
        let bytes = base.as_bytes();
        if bytes.len() >= 2 && bytes[bytes.len() - 1] == bytes[bytes.len() - 2] {
            out.push(base[..base.len() - 1].to_string());
        }
    }
    out
}

/// Quoted strings: between double, typographic or back quotes, or single
/// quotes that open after a space and close before one (not apostrophes).
fn quoted(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let close = match c {
            '"' => Some('"'),
            '“' => Some('”'),
            '`' => Some('`'),
            '«' => Some('»'),
            '\'' if i == 0 || !chars[i - 1].is_alphanumeric() => Some('\''),
            _ => None,
        };
        if let Some(close) = close {
            let rest = &chars[i + 1..];
            let end = rest.iter().enumerate().position(|(j, &x)| {
                x == close
                    && (close != '\'' || rest.get(j + 1).is_none_or(|n| !n.is_alphanumeric()))
            });
            if let Some(end) = end {
                let s: String = rest[..end].iter().collect();
                if !s.trim().is_empty() {
                    out.insert(s.trim().to_string());
                }
                i += end + 2;
                continue;
            }
        }
        i += 1;
    }
    out
}

impl Features {
    pub fn of(text: &str) -> Features {
        let mut f = Features {
            words: BTreeSet::new(),
            numbers: BTreeSet::new(),
            negated: false,
            entities: Vec::new(),
            quoted: quoted(text),
            formats: BTreeSet::new(),
            polar: BTreeSet::new(),
            directional: false,
            content: Vec::new(),
            language: 0,
        };
        let mut sentence_start = true;
        // Split on anything that is not part of a word or a number.
        let mut word = String::new();
        let mut flush = |word: &mut String, sentence_start: &mut bool, end: Option<char>| {
            if !word.is_empty() {
                f.word(word, *sentence_start);
                *sentence_start = false;
                word.clear();
            }
            if let Some(c) = end {
                if matches!(c, '.' | '!' | '?' | ':' | '\n' | ';') {
                    *sentence_start = true;
                }
            }
        };
        let chars: Vec<char> = text.chars().collect();
        for (i, &c) in chars.iter().enumerate() {
            let next = chars.get(i + 1).copied();
            let inner = |n: Option<char>| n.is_some_and(|n| n.is_alphanumeric());
            let keep = c.is_alphanumeric()
                || ((c == '\'' || c == '’') && !word.is_empty() && inner(next))
                || ((c == '.' || c == ',')
                    && word.chars().last().is_some_and(|p| p.is_ascii_digit())
                    && next.is_some_and(|n| n.is_ascii_digit()))
                || ((c == '-' || c == '+') && !word.is_empty() && inner(next))
                || (c == '%' && word.chars().last().is_some_and(|p| p.is_ascii_digit()));
            if keep {
                word.push(c);
            } else {
                flush(&mut word, &mut sentence_start, Some(c));
            }
        }
        flush(&mut word, &mut sentence_start, None);
        f
    }

    fn word(&mut self, raw: &str, sentence_start: bool) {
        let w = fold(raw);
        let mut number = true;
        if raw.chars().any(|c| c.is_ascii_digit()) {
            // "1,000" is "1000"; a number glued to a name ("GPT-4") is both.
            self.numbers.insert(w.replace(',', ""));
        } else if let Some((_, n)) = NUMBER_WORDS.iter().find(|(name, _)| *name == w) {
            self.numbers.insert((*n).to_string());
        } else {
            number = false;
        }
        if NEGATIONS.contains(&w.as_str()) || w.ends_with("nt") && raw.contains(['\'', '’']) {
            self.negated = true;
        }
        if ENGLISH.contains(&w.as_str()) {
            self.language += 1;
        } else if OTHER_LANGUAGES.contains(&w.as_str()) {
            self.language -= 1;
        }
        if DIRECTIONAL.contains(&w.as_str()) {
            self.directional = true;
        }
        let s = stem(&w);
        if let Some(p) = base_forms(&w).iter().find_map(|f| polar_word(f)) {
            self.polar.insert(p);
        }
        if let Some(fmt) = FORMATS.iter().find(|x| **x == w || **x == s) {
            self.formats.insert(fmt);
        }
        // Numbers are compared on their own ("three" is "3").
        if !number && !FUNCTION_WORDS.contains(&w.as_str()) {
            self.content.push(s.clone());
        }
        if is_entity(raw, &w, sentence_start) {
            self.entities.push(w.clone());
        }
        self.words.insert(w);
    }
}

/// A name: capitalised (not at a sentence start, or not a common word
/// there), an acronym, or a word with capitals or digits inside.
fn is_entity(raw: &str, folded: &str, sentence_start: bool) -> bool {
    let mut chars = raw.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    let rest: Vec<char> = chars.collect();
    let inner_capital = rest.iter().any(|c| c.is_uppercase());
    let has_letter = raw.chars().any(char::is_alphabetic);
    if !has_letter || folded == "i" {
        return false;
    }
    if inner_capital || (raw.chars().any(|c| c.is_ascii_digit()) && first.is_alphabetic()) {
        return true;
    }
    first.is_uppercase() && (!sentence_start || !COMMON_STARTERS.contains(&folded))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(a: &str, b: &str) -> Result<(), Refusal> {
        check(&Features::of(a), &Features::of(b))
    }

    #[test]
    fn paraphrases_pass() {
        for (a, b) in [
            (
                "What is the capital of France?",
                "What's the capital city of France",
            ),
            (
                "Paris is the capital of which country?",
                "Which country has Paris as its capital?",
            ),
            (
                "How do I reverse a list in Python?",
                "how to reverse a Python list",
            ),
            (
                "Explain how photosynthesis works.",
                "Can you explain photosynthesis?",
            ),
            (
                "Who is the author of 'Pride and Prejudice'?",
                "Who's the author of 'Pride and Prejudice'",
            ),
            ("Why isn't the sky green?", "Why is the sky not green?"),
        ] {
            assert_eq!(guard(a, b), Ok(()), "{a} / {b}");
        }
    }

    #[test]
    fn near_misses_are_refused_with_the_reason() {
        use Refusal::*;
        for (a, b, why) in [
            ("What is 15% of 80?", "What is 20% of 80?", Numbers),
            (
                "List three uses of copper",
                "List five uses of copper",
                Numbers,
            ),
            (
                "Is coffee good for you?",
                "Is coffee not good for you?",
                Negation,
            ),
            ("Why do cats purr?", "Why don't cats purr?", Negation),
            (
                "What is the capital of France?",
                "What is the capital of Germany?",
                Entities,
            ),
            (
                "Convert 10 Celsius to Fahrenheit",
                "Convert 10 Fahrenheit to Celsius",
                Entities,
            ),
            (
                "What are the advantages of nuclear power?",
                "What are the disadvantages of nuclear power?",
                Opposite,
            ),
            (
                "How do I encrypt a file?",
                "How do I decrypt a file?",
                Opposite,
            ),
            (
                "Translate \"good morning\" to French",
                "Translate \"good night\" to French",
                Quoted,
            ),
            (
                "Describe the water cycle as a poem",
                "Describe the water cycle as a table",
                Format,
            ),
            (
                "What is the chemical symbol for gold?",
                "What is the chemical symbol for silver?",
                Substitution,
            ),
            (
                "What is the capital of France?",
                "Quelle est la capitale de la France ?",
                Language,
            ),
        ] {
            assert_eq!(guard(a, b), Err(why), "{a} / {b}");
        }
    }

    #[test]
    fn number_forms_and_quotes() {
        let f = Features::of("Is 1,000 more than one thousand? Say 'it's fine' or \"no\"");
        assert!(f.numbers.contains("1000"));
        assert!(f.quoted.contains("it's fine"), "{:?}", f.quoted);
        assert!(f.quoted.contains("no"));
        assert_eq!(guard("three apples", "3 apples"), Ok(()));
        assert_eq!(
            guard("What is GPT-4?", "What is GPT-3?"),
            Err(Refusal::Numbers)
        );
    }
}
