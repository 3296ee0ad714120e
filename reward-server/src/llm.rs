//! The LLM annotator: one chat-completions request per caption to an
//! OpenAI-compatible endpoint (`<base_url>/chat/completions`), at most
//! `concurrency` in flight, each with a timeout and retried with doubling
//! backoff on 5xx, 429, timeouts and connection errors. The answer's last
//! `LABEL: helpful|unhelpful` line is the label; an answer without one (or a
//! body that is not a chat completion) counts as unhelpful, as ONI does.
//! For the ranking model a request carries two captions and the last
//! `ANSWER: 1|2|tie` line is the preference; anything else is a tie.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_core::config::LlmConfig;
use tokio::sync::Semaphore;

use crate::error::{Error, Result};

/// The built-in judge prompt for classification (`prompts/classify.txt`).
pub const CLASSIFY_PROMPT: &str = include_str!("../prompts/classify.txt");
/// The built-in judge prompt for ranking (`prompts/rank.txt`).
pub const RANK_PROMPT: &str = include_str!("../prompts/rank.txt");

pub struct LlmAnnotator {
    client: reqwest::Client,
    url: String,
    model: String,
    api_key: Option<String>,
    prompt: String,
    retries: u32,
    permits: Arc<Semaphore>,
}

/// The label in a judge's answer: the last `label:` followed by `helpful` or
/// `unhelpful`; anything else is unhelpful.
pub fn parse_label(answer: &str) -> bool {
    let lower = answer.to_lowercase();
    match lower.rfind("label:") {
        Some(i) => lower[i + "label:".len()..]
            .split(|c: char| !c.is_alphanumeric())
            .find(|w| !w.is_empty())
            .is_some_and(|w| w == "helpful"),
        None => false,
    }
}

/// The preference in a judge's answer: P(message 1 is better) from the last
/// `answer:` followed by `1`, `2` or `tie`; anything else is a tie (0.5).
pub fn parse_preference(answer: &str) -> f64 {
    let lower = answer.to_lowercase();
    let word = lower.rfind("answer:").and_then(|i| {
        lower[i + "answer:".len()..].split(|c: char| !c.is_alphanumeric()).find(|w| !w.is_empty()).map(String::from)
    });
    match word.as_deref() {
        Some("1") => 1.0,
        Some("2") => 0.0,
        _ => 0.5,
    }
}

impl LlmAnnotator {
    /// `ranking` picks the built-in ranking prompt when the config names no prompt file.
    pub fn new(cfg: &LlmConfig, ranking: bool) -> Result<Self> {
        let prompt = match &cfg.prompt_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| Error::Io { what: format!("judge prompt {}", path.display()), source: e })?,
            None if ranking => RANK_PROMPT.to_string(),
            None => CLASSIFY_PROMPT.to_string(),
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(cfg.timeout_s))
            .build()
            .map_err(|e| Error::Annotator(format!("HTTP client: {e}")))?;
        Ok(LlmAnnotator {
            client,
            url: format!("{}/chat/completions", cfg.base_url.trim_end_matches('/')),
            model: cfg.model.clone(),
            api_key: std::env::var(&cfg.api_key_env).ok().filter(|k| !k.is_empty()),
            prompt,
            retries: cfg.retries,
            permits: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
        })
    }

    pub fn name(&self) -> String {
        format!("llm `{}` at {}", self.model, self.url)
    }

    /// Labels for `captions`, requested concurrently (bounded by the permits).
    pub async fn label(&self, captions: &[String]) -> Result<Vec<bool>> {
        let all = futures::future::join_all(captions.iter().map(|c| self.label_one(c))).await;
        all.into_iter().collect()
    }

    async fn label_one(&self, caption: &str) -> Result<bool> {
        Ok(self.ask(caption).await?.is_some_and(|c| parse_label(&c)))
    }

    /// P(first better) for each pair, requested concurrently.
    pub async fn compare(&self, pairs: &[(String, String)]) -> Result<Vec<f64>> {
        let all = futures::future::join_all(pairs.iter().map(|(a, b)| async move {
            let answer = self.ask(&format!("Message 1: {a}\nMessage 2: {b}")).await?;
            Ok(answer.map_or(0.5, |c| parse_preference(&c)))
        }))
        .await;
        all.into_iter().collect()
    }

    /// One chat completion for `user` under the judge prompt: the answer's text,
    /// or None when the body is not a chat completion.
    async fn ask(&self, user: &str) -> Result<Option<String>> {
        let _permit = self.permits.acquire().await.map_err(|e| Error::Annotator(e.to_string()))?;
        let body = json!({
            "model": self.model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": self.prompt},
                {"role": "user", "content": user},
            ],
        });
        let mut backoff = Duration::from_millis(200);
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            let mut req = self.client.post(&self.url).json(&body);
            if let Some(key) = &self.api_key {
                req = req.bearer_auth(key);
            }
            match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    return Ok(resp
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|v| v["choices"][0]["message"]["content"].as_str().map(String::from)));
                }
                Ok(resp) if resp.status().is_server_error() || resp.status().as_u16() == 429 => {
                    last = format!("HTTP {}", resp.status());
                }
                Ok(resp) => return Err(Error::Annotator(format!("{} answered HTTP {}", self.url, resp.status()))),
                Err(e) => last = e.to_string(),
            }
        }
        Err(Error::Annotator(format!("{} failed {} times, last: {last}", self.url, self.retries + 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_label, parse_preference};

    #[test]
    fn preferences_parse_from_the_last_answer_line_and_default_to_a_tie() {
        assert_eq!(parse_preference("Message 1 finds the key.\nANSWER: 1"), 1.0);
        assert_eq!(parse_preference("answer: 2."), 0.0);
        assert_eq!(parse_preference("ANSWER: 1\nOn reflection, ANSWER: tie"), 0.5);
        assert_eq!(parse_preference("Message 2 is better"), 0.5, "no answer line is a tie");
        assert_eq!(parse_preference("ANSWER: 3"), 0.5);
    }

    #[test]
    fn labels_parse_from_the_last_label_line() {
        assert!(parse_label("The key opens the door.\nLABEL: helpful"));
        assert!(!parse_label("LABEL: unhelpful"));
        assert!(!parse_label("label: helpful?\nActually no.\nLabel: Unhelpful."));
        assert!(parse_label("label:HELPFUL"));
        assert!(!parse_label("I think it is helpful"), "no label line is unhelpful");
        assert!(!parse_label(""));
    }
}
