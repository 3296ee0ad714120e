//! Property tests of the verifiers and the job-file decoder: whatever text a
//! policy writes or a user submits, scoring and parsing answer (a reward in
//! {0, 1}, a config or a field-named error) and never panic; the numeric
//! verifier is right on integers of every size and never rewards an
//! overflowing number.

use proptest::prelude::*;
use sluice_core::config::{AnswerFormat, JobConfig};
use sluice_core::tasks::{extract_answer, parse_expression, parse_number, Verifier};
use sluice_core::Error;

fn config() -> ProptestConfig {
    ProptestConfig { cases: 512, ..ProptestConfig::default() }
}

const VERIFIERS: [Verifier; 5] =
    [Verifier::Exact, Verifier::Numeric, Verifier::Countdown, Verifier::Regex, Verifier::MultipleChoice];

/// Text that looks like what verifiers parse: digits, signs, fractions, boxes,
/// `####`, letters, regex metacharacters, unicode.
fn answerish() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,80}",
        "[-+0-9.,/ ]{0,60}",
        "(\\\\boxed\\{|\\\\frac\\{|\\}|\\{|####|[0-9]{1,50}|[A-J]|[()*+?|.^$]|-| |\n|=|:){0,24}",
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Every verifier, any answer, any response: 0.0 or 1.0, no panic.
    #[test]
    fn verifiers_score_zero_or_one_and_never_panic(answer in answerish(), response in answerish()) {
        for v in VERIFIERS {
            let _ = v.check_answer(&answer);
            let s = v.score(&answer, &response);
            prop_assert!(s == 0.0 || s == 1.0, "{v:?} scored {s}");
        }
        if let Some(a) = extract_answer(&response) {
            prop_assert!(response.contains(a), "the extracted answer is part of the response");
        }
        let _ = parse_number(&response);
        if let Ok(e) = parse_expression(&response) {
            let _ = e.eval();
        }
        for f in [AnswerFormat::Plain, AnswerFormat::Gsm8k, AnswerFormat::Boxed] {
            let _ = f.extract(&response);
        }
    }

    /// Integers of any i64 value, written plainly, after `####`, boxed or with
    /// thousands separators, score 1 against themselves and 0 against any other.
    #[test]
    fn the_numeric_verifier_is_exact_on_integers(a in any::<i64>(), b in any::<i64>(), form in 0usize..4) {
        let written = match form {
            0 => format!("so it is {a}"),
            1 => format!("work...\n#### {a}"),
            2 => format!("the answer is \\boxed{{{a}}}."),
            _ => {
                let digits = a.unsigned_abs().to_string();
                let mut grouped = String::new();
                for (i, c) in digits.chars().enumerate() {
                    if i > 0 && (digits.len() - i) % 3 == 0 {
                        grouped.push(',');
                    }
                    grouped.push(c);
                }
                format!("#### {}{grouped}", if a < 0 { "-" } else { "" })
            }
        };
        prop_assert_eq!(Verifier::Numeric.score(&a.to_string(), &written), 1.0, "{}", written);
        if a != b {
            prop_assert_eq!(Verifier::Numeric.score(&b.to_string(), &written), 0.0, "{} vs {}", written, b);
        }
    }

    /// A number too long for exact arithmetic is never read as 0 (or as any
    /// small number): no reward for overflowing the parser.
    #[test]
    fn overflowing_numbers_are_not_rewarded(lead in 1u8..=9, rest in "[0-9]{39,80}", small in -1000i64..1000) {
        let huge = format!("{lead}{rest}");
        prop_assert_eq!(Verifier::Numeric.score(&small.to_string(), &format!("#### {huge}")), 0.0);
        prop_assert_eq!(Verifier::Numeric.score(&small.to_string(), &format!("#### -{huge}")), 0.0);
    }

    /// `exact` accepts the answer itself, whatever it is.
    #[test]
    fn exact_accepts_the_answer(answer in ".{0,80}") {
        prop_assert_eq!(Verifier::Exact.score(&answer, &format!("  {answer}\n")), 1.0);
    }

    /// Any text as a job file: a config or a config/TOML error, no panic.
    #[test]
    fn any_text_as_a_job_file_never_panics(text in ".{0,400}") {
        let _ = JobConfig::from_toml(&text);
    }

    /// A valid job file with one number replaced by anything (huge, negative,
    /// NaN, infinity, fractional): accepted, or refused naming that field (or
    /// the field it conflicts with) — the same answer in `check` and `submit`,
    /// which both call `from_toml`.
    #[test]
    fn one_bad_number_is_refused_by_name(
        field in prop::sample::select(vec![
            ("train", "prompts_per_step"), ("train", "steps"), ("train", "lr"), ("train", "micro_batch_size"),
            ("train", "eval_prompts"), ("train", "weight_decay"), ("train", "adam_eps"), ("train", "max_grad_norm"),
            ("grpo", "group_size"), ("grpo", "clip_low"), ("grpo", "clip_high"), ("grpo", "kl_coef"),
            ("grpo", "mini_batches"), ("grpo", "epochs"), ("rollout", "max_staleness"), ("rollout", "buffer_groups"),
            ("rollout", "weight_chunk_bytes"), ("rollout", "max_rollout_bytes"), ("rollout", "max_group_size"),
            ("sampling", "max_new_tokens"), ("sampling", "temperature"), ("sampling", "top_p"), ("sampling", "top_k"),
            ("reward", "queue_capacity"), ("reward", "batch_size"), ("reward", "int_coef"), ("reward", "beta"),
            ("budget", "n_low"), ("budget", "n_up"), ("budget", "alpha"), ("resources", "actors"), ("resources", "learners"),
        ]),
        value in prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| if v.is_nan() { "nan".to_string() } else if v.is_infinite() { if v > 0.0 { "inf".into() } else { "-inf".into() } } else { format!("{v:e}") }),
            Just("1e12".to_string()), Just("-1".to_string()), Just("0".to_string()), Just("nan".to_string()),
            Just("18446744073709551615".to_string()), Just("9223372036854775807".to_string()),
        ],
    ) {
        let (section, key) = field;
        let text = format!("[model]\npreset = \"tiny\"\n[task]\nkind = \"arithmetic\"\n[{section}]\n{key} = {value}\n");
        match JobConfig::from_toml(&text) {
            Ok(cfg) => {
                // Whatever was accepted can be multiplied without overflow.
                let _ = cfg.train.prompts_per_step.checked_mul(cfg.grpo.group_size).expect("bounded product");
            }
            Err(Error::Config { path, reason }) => {
                prop_assert!(!path.is_empty() && !reason.is_empty());
                prop_assert!(path.starts_with(section) || path == "(root)" || path.contains('.'), "{} for {}.{}", path, section, key);
            }
            Err(other) => prop_assert!(false, "not a config error: {other:?}"),
        }
    }
}
