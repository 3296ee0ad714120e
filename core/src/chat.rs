//! Chat templates: a checkpoint's Jinja `chat_template` rendered with `minijinja`.
//!
//! `transformers` renders templates with Python's jinja2 (`trim_blocks`,
//! `lstrip_blocks`, Python string methods on values, `raise_exception`,
//! `strftime_now`, a `tojson` that does not escape HTML). The environment here
//! sets the same switches, adds `minijinja-contrib`'s Python-compatible methods
//! (`.strip()`, `.startswith()`, `.split()`, …) and the same helper functions,
//! so a template renders to the same text; `core/tests/it/chat.rs` checks this
//! against `apply_chat_template` on Qwen3's template and on one written for tests.
//!
//! The rendered text already holds every special token the template wants (BOS
//! included), so it is tokenized without the tokenizer's post-processor.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message { role: role.to_string(), content: content.into() }
    }
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    /// Where the template came from, for errors (`…/tokenizer_config.json`).
    origin: String,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).finish_non_exhaustive()
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; `origin` names it in errors.
    pub fn new(source: &str, origin: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        // jinja2 as transformers configures it.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("default delimiters are valid");
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| Error::Template { origin: origin.to_string(), reason: describe(&e) })?;
        Ok(ChatTemplate { env, origin: origin.to_string(), source: source.to_string(), bos_token, eos_token })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; `add_generation_prompt` opens the assistant's turn.
    /// `extra` adds template variables (`enable_thinking = false` for Qwen3, say).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let mut ctx = extra.clone();
        ctx.insert("messages".into(), serde_json::to_value(messages).expect("messages serialise"));
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("bos_token".into(), self.bos_token.clone().unwrap_or_default().into());
        ctx.insert("eos_token".into(), self.eos_token.clone().unwrap_or_default().into());
        let tmpl = self.env.get_template(NAME).expect("added in new");
        tmpl.render(minijinja::Value::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| Error::Template { origin: self.origin.clone(), reason: describe(&e) })
    }
}

/// The error with its line and the chain of causes.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// Python's `json.dumps(value, ensure_ascii=False)`: `", "` and `": "` separators,
/// no HTML escaping (transformers replaces jinja2's `tojson` with this).
fn tojson(value: minijinja::Value) -> std::result::Result<String, minijinja::Error> {
    let v = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_python_json(&v, &mut out);
    Ok(out)
}

fn write_python_json(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match v {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_python_json(item, out);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// `strftime_now(format)` for templates that print today's date (Llama 3.2):
/// the UTC date with `%d`, `%b`, `%B`, `%m`, `%Y`, `%y`, `%H`, `%M` and `%%`.
fn strftime_now(format: &str) -> std::result::Result<String, minijinja::Error> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Ok(strftime(format, secs))
}

fn strftime(format: &str, unix_secs: u64) -> String {
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    let days = (unix_secs / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    let (hh, mm) = ((unix_secs % 86_400) / 3600, (unix_secs % 3600) / 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month 1..=12, day 1..=31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_python_json() {
        assert_eq!(strftime("%d %b %Y", 0), "01 Jan 1970");
        // 2024-07-26 12:34 UTC.
        assert_eq!(strftime("%d %B %Y %H:%M %%", 1_721_997_240), "26 July 2024 12:34 %");
        assert_eq!(strftime("%y-%m-%d", 951_782_400), "00-02-29");
        let v = minijinja::Value::from(minijinja::value::Serde(serde_json::json!({"a": [1, "<b>"], "é": null})));
        assert_eq!(tojson(v).unwrap(), r#"{"a": [1, "<b>"], "é": null}"#);
    }

    #[test]
    fn bad_templates_name_their_origin() {
        let e = ChatTemplate::new("{% for m in messages %}", "dir/tokenizer_config.json", None, None).unwrap_err();
        assert!(e.to_string().contains("dir/tokenizer_config.json"), "{e}");
        let t = ChatTemplate::new("{{ raise_exception('only user turns') }}", "t.jinja", None, None).unwrap();
        let e = t.render(&[Message::new("user", "hi")], true, &Default::default()).unwrap_err().to_string();
        assert!(e.contains("t.jinja") && e.contains("only user turns"), "{e}");
    }
}
