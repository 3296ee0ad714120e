//! Verifiers: named answer checkers that turn a response into an extrinsic
//! reward in {0, 1}. None of them evaluates code.
//!
//! * `exact` — trimmed response equals the trimmed answer.
//! * `numeric` — the response's final answer (the last `\boxed{..}`, else the
//!   text after the last `####`, else the last number in the text) equals the
//!   reference numerically: integers with sign and thousands separators,
//!   decimals, `a/b` and `\frac{a}{b}` compare exactly as rationals; anything
//!   else (exponents) within 1e-6 relative.
//! * `countdown` — see [`super::countdown`].
//! * `regex` — the answer is a regular expression (Rust `regex` syntax, linear
//!   time) that must match the whole trimmed final answer.
//! * `multiple_choice` — the answer is a letter; the response's chosen letter is
//!   the last standalone capital A–J, inside `\boxed{}` / `(X)` / "answer is X"
//!   or alone.

use serde::{Deserialize, Serialize};

use super::countdown;
use super::expr::Rational;

/// Named answer checkers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verifier {
    Exact,
    Numeric,
    Countdown,
    Regex,
    MultipleChoice,
}

/// Every verifier name, as configs and JSONL rows spell them.
pub const VERIFIER_NAMES: &[&str] = &["exact", "numeric", "countdown", "regex", "multiple_choice"];

impl Verifier {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "exact" => Verifier::Exact,
            "numeric" => Verifier::Numeric,
            "countdown" => Verifier::Countdown,
            "regex" => Verifier::Regex,
            "multiple_choice" => Verifier::MultipleChoice,
            _ => return None,
        })
    }

    /// The name configs, JSONL rows and the reward protocol use.
    pub fn name(self) -> &'static str {
        match self {
            Verifier::Exact => "exact",
            Verifier::Numeric => "numeric",
            Verifier::Countdown => "countdown",
            Verifier::Regex => "regex",
            Verifier::MultipleChoice => "multiple_choice",
        }
    }

    /// Checks that `answer` is usable by this verifier (a regex compiles, a
    /// choice is one letter, a numeric answer parses); the reason otherwise.
    pub fn check_answer(self, answer: &str) -> Result<(), String> {
        match self {
            Verifier::Exact | Verifier::Countdown => Ok(()),
            Verifier::Numeric => {
                parse_number(answer.trim()).map(|_| ()).ok_or_else(|| format!("`{answer}` is not a number"))
            }
            Verifier::Regex => build_regex(answer).map(|_| ()),
            Verifier::MultipleChoice => {
                choice_letter(answer.trim()).map(|_| ()).ok_or_else(|| format!("`{answer}` is not a choice letter A-J"))
            }
        }
    }

    /// Reward in {0, 1}.
    pub fn score(self, answer: &str, response: &str) -> f64 {
        let ok = match self {
            Verifier::Exact => response.trim() == answer.trim(),
            Verifier::Numeric => match (extract_answer(response).and_then(parse_number), parse_number(answer.trim())) {
                (Some(a), Some(b)) => a.equals(&b),
                _ => false,
            },
            Verifier::Countdown => countdown::check(answer, response),
            Verifier::Regex => match (build_regex(answer), extract_answer(response)) {
                (Ok(re), Some(a)) => re.is_match(a.trim()),
                _ => false,
            },
            Verifier::MultipleChoice => match (chosen_letter(response), choice_letter(answer.trim())) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            },
        };
        if ok {
            1.0
        } else {
            0.0
        }
    }
}

/// Patterns compiled per thread, kept for the next item: the members of a
/// group (and its `check_answer`) share one answer, so it compiles once.
const REGEX_CACHE: usize = 256;

fn build_regex(pattern: &str) -> Result<regex::Regex, String> {
    thread_local! {
        static CACHE: std::cell::RefCell<std::collections::HashMap<String, regex::Regex>> = Default::default();
    }
    if let Some(re) = CACHE.with(|c| c.borrow().get(pattern).cloned()) {
        return Ok(re);
    }
    let re = regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("invalid regex `{pattern}`: {e}"))?;
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= REGEX_CACHE {
            c.clear();
        }
        c.insert(pattern.to_string(), re.clone());
    });
    Ok(re)
}

/// The content of the last balanced `\boxed{...}` in `text`.
pub(crate) fn last_boxed(text: &str) -> Option<&str> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..start + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// The final answer of a response: last `\boxed{}`, else what follows the last
/// `####` (to the end of its line), else the last number, else the trimmed text.
pub fn extract_answer(response: &str) -> Option<&str> {
    if let Some(b) = last_boxed(response) {
        return Some(b.trim());
    }
    if let Some(i) = response.rfind("####") {
        let rest = response[i + 4..].lines().next().unwrap_or("").trim();
        if !rest.is_empty() {
            return Some(rest);
        }
    }
    last_number(response).or_else(|| Some(response.trim()).filter(|s| !s.is_empty()))
}

/// The last number-looking span: optional sign, digits with `,` groups, an
/// optional decimal part, and an optional `/denominator`.
fn last_number(text: &str) -> Option<&str> {
    let b = text.as_bytes();
    let mut end = b.len();
    while end > 0 && !b[end - 1].is_ascii_digit() {
        end -= 1;
    }
    if end == 0 {
        return None;
    }
    let mut start = end;
    while start > 0 && (b[start - 1].is_ascii_digit() || matches!(b[start - 1], b'.' | b',' | b'/')) {
        start -= 1;
    }
    while start < end && matches!(b[start], b'.' | b',' | b'/') {
        start += 1;
    }
    if start > 0 && b[start - 1] == b'-' {
        start -= 1;
    }
    Some(&text[start..end])
}

/// A parsed number: exact when it was an integer, decimal or fraction.
#[derive(Debug, Clone, Copy)]
pub enum Number {
    Exact(Rational),
    Approx(f64),
}

impl Number {
    fn equals(&self, other: &Number) -> bool {
        match (self, other) {
            (Number::Exact(a), Number::Exact(b)) => a == b,
            _ => {
                let (a, b) = (self.to_f64(), other.to_f64());
                (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
            }
        }
    }
    fn to_f64(self) -> f64 {
        match self {
            Number::Exact(r) => r.num as f64 / r.den as f64,
            Number::Approx(x) => x,
        }
    }
}

fn parse_decimal(s: &str) -> Option<Rational> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let body = body.replace(',', "");
    let (int, frac) = body.split_once('.').unwrap_or((&body, ""));
    if int.is_empty() && frac.is_empty() || !int.bytes().chain(frac.bytes()).all(|c| c.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 30 {
        return None;
    }
    // All zeros is 0; digits beyond i128 are not an exact number (the caller
    // falls back to floating point) and never silently 0.
    let digits = format!("{int}{frac}");
    let digits: i128 = match digits.trim_start_matches('0') {
        "" => 0,
        d => d.parse().ok()?,
    };
    let den = 10i128.checked_pow(frac.len() as u32)?;
    Rational::new(if neg { -digits } else { digits }, den)
}

/// Parses `12`, `-3.5`, `1,000`, `3/4`, `\frac{3}{4}`, `$12` or `1e-3`.
pub fn parse_number(text: &str) -> Option<Number> {
    let t = text.trim().trim_start_matches('$').trim_end_matches(['.', '%']).trim();
    if let Some(inner) = t.strip_prefix("\\frac{").or_else(|| t.strip_prefix("\\dfrac{")) {
        let (num, rest) = inner.split_once("}{")?;
        let den = rest.strip_suffix('}')?;
        let (a, b) = (parse_decimal(num.trim())?, parse_decimal(den.trim())?);
        return Rational::new(a.num.checked_mul(b.den)?, a.den.checked_mul(b.num)?).map(Number::Exact);
    }
    if let Some((num, den)) = t.split_once('/') {
        let (a, b) = (parse_decimal(num.trim())?, parse_decimal(den.trim())?);
        return Rational::new(a.num.checked_mul(b.den)?, a.den.checked_mul(b.num)?).map(Number::Exact);
    }
    if let Some(r) = parse_decimal(t) {
        return Some(Number::Exact(r));
    }
    t.parse::<f64>().ok().filter(|x| x.is_finite()).map(Number::Approx)
}

fn choice_letter(s: &str) -> Option<char> {
    let s = s.trim_matches(|c: char| c == '(' || c == ')' || c == '.' || c.is_whitespace());
    let mut chars = s.chars();
    let c = chars.next()?;
    (chars.next().is_none() && ('A'..='J').contains(&c)).then_some(c)
}

/// The letter a response chose.
fn chosen_letter(response: &str) -> Option<char> {
    if let Some(b) = last_boxed(response) {
        return choice_letter(b);
    }
    let lower = response.to_ascii_lowercase();
    if let Some(i) = lower.rfind("answer is") {
        if let Some(c) = response[i + "answer is".len()..]
            .split(|c: char| c.is_whitespace() || c == ':')
            .find(|w| !w.is_empty())
            .and_then(choice_letter)
        {
            return Some(c);
        }
    }
    // The last standalone letter A-J, e.g. "(B)" or "B".
    let b = response.as_bytes();
    (0..b.len()).rev().find_map(|i| {
        let c = b[i] as char;
        let before = i == 0 || !b[i - 1].is_ascii_alphanumeric();
        let after = i + 1 == b.len() || !b[i + 1].is_ascii_alphanumeric();
        (('A'..='J').contains(&c) && before && after).then_some(c)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_extracts_and_compares_exactly() {
        let v = Verifier::Numeric;
        let cases = [
            ("So the total is \\boxed{42}.", "42", 1.0),
            ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),
            ("step 1: 5\n#### -1,200\n", "-1200", 1.0),
            ("the answer is 3/6", "1/2", 1.0),
            ("I think 7 apples, or maybe 8", "8", 1.0),
            ("costs $12.50.", "12.5", 1.0),
            ("0.1 + 0.2 = 0.3", "0.3", 1.0),
            ("\\boxed{41}", "42", 0.0),
            ("no number here", "1", 0.0),
            ("12", "-12", 0.0),
            ("\\boxed{1e-3}", "0.001", 1.0),
            // Too many digits for an exact number: not 0 (a reward hack before).
            ("#### 1000000000000000000000000000000000000000000000", "0", 0.0),
            ("#### 0000000000000000000000000000000000000000000000", "0", 1.0),
        ];
        for (response, answer, want) in cases {
            assert_eq!(v.score(answer, response), want, "{response:?} vs {answer}");
        }
        assert!(v.check_answer("abc").is_err() && v.check_answer("-3.25").is_ok());
    }

    #[test]
    fn regex_and_multiple_choice() {
        assert_eq!(Verifier::Regex.score("[0-9]+ (apples|pears)", "Answer: \\boxed{12 pears}"), 1.0);
        assert_eq!(Verifier::Regex.score("[0-9]+", "\\boxed{12a}"), 0.0, "whole-answer match");
        assert!(Verifier::Regex.check_answer("(unclosed").is_err());
        let mc = Verifier::MultipleChoice;
        assert_eq!(mc.score("B", "The answer is B."), 1.0);
        assert_eq!(mc.score("B", "Between (A) and (C), I pick (B)"), 1.0);
        assert_eq!(mc.score("c", "\\boxed{C}"), 0.0, "lower-case answer is not a letter choice");
        assert_eq!(mc.score("C", "\\boxed{C}"), 1.0);
        assert_eq!(mc.score("A", "Clearly D"), 0.0);
        assert!(mc.check_answer("AB").is_err());
    }

    #[test]
    fn names_round_trip() {
        for n in VERIFIER_NAMES {
            let v = Verifier::parse(n).unwrap();
            assert_eq!(serde_json::to_value(v).unwrap(), serde_json::json!(n));
            assert_eq!(v.name(), *n);
        }
        assert!(Verifier::parse("python").is_none());
    }
}
