//! Property tests of every decoder a peer's bytes reach: arbitrary protobuf
//! bytes, arbitrary field values and arbitrary JSON event lines are refused
//! with a reason, never a panic; what the encoder writes decodes to itself.

use proptest::prelude::*;
use prost::Message;
use sluice_core::rollout::{FinishReason, Rollout};
use sluice_proto::codec::{encode, Placement};
use sluice_proto::{events, packed, v1};

fn config() -> ProptestConfig {
    ProptestConfig { cases: 512, ..ProptestConfig::default() }
}

/// A wire rollout whose every field is arbitrary (bytes of any length, any numbers).
fn any_wire() -> impl Strategy<Value = v1::Rollout> {
    (
        (any::<u64>(), any::<u32>(), any::<u32>(), any::<u64>()),
        (prop::collection::vec(any::<u8>(), 0..64), prop::collection::vec(any::<u8>(), 0..64)),
        (prop::collection::vec(any::<u8>(), 0..64), prop::collection::vec(any::<u8>(), 0..16)),
        (prop::option::of((any::<f64>(), any::<f64>(), any::<f64>())), any::<u64>(), any::<i32>(), any::<u64>()),
        (prop::collection::vec(any::<u32>(), 0..4), prop::collection::vec(any::<u64>(), 0..4)),
    )
        .prop_map(|((group_id, group_size, index, prompt_id), (prompt, response), (logprobs, mask), (rewards, version, finish, work_id), (switch_at, switch_version))| {
            v1::Rollout {
                job_id: "j".into(),
                actor_id: "a".into(),
                group_id,
                group_size,
                index,
                prompt_id,
                prompt_tokens: prompt.into(),
                response_tokens: response.into(),
                logprobs: logprobs.into(),
                loss_mask: mask.into(),
                rewards: rewards.map(|(extrinsic, intrinsic, total)| v1::Rewards { extrinsic, intrinsic, total }),
                policy_version: version,
                finish,
                timings: None,
                work_id,
                switch_at,
                switch_version,
                traceparent: String::new(),
            }
        })
}

/// A rollout the actor could have produced.
fn any_rollout() -> impl Strategy<Value = Rollout> {
    (
        prop::collection::vec(0i64..200_000, 1..32),
        prop::collection::vec((0i64..200_000, -30.0f32..=0.0, any::<bool>()), 0..32),
        any::<bool>(),
        (-10.0f64..10.0, -10.0f64..10.0, 0u64..u64::MAX / 2, any::<u64>(), 0usize..3),
        prop::collection::vec((1u32..5, 1u64..5), 0..3),
    )
        .prop_map(|(prompt, response, with_logprobs, (extrinsic, intrinsic, version, prompt_id, finish), steps)| {
            // Version switches inside the response, later in both position and version.
            let (mut at, mut v) = (0u32, version);
            let switches = steps
                .into_iter()
                .map(|(da, dv)| {
                    (at, v) = (at + da, v + dv);
                    (at, v)
                })
                .filter(|&(at, _)| (at as usize) < response.len())
                .collect();
            Rollout {
            prompt_id,
            prompt_tokens: prompt,
            response_tokens: response.iter().map(|r| r.0).collect(),
            logprobs: with_logprobs.then(|| response.iter().map(|r| r.1).collect()),
            loss_mask: response.iter().map(|r| r.2).collect(),
            captions: Vec::new(),
            switches,
            reward: extrinsic + intrinsic,
            extrinsic,
            intrinsic,
            version,
            finish: [FinishReason::Stop, FinishReason::Length, FinishReason::Stop][finish],
        }})
}

proptest! {
    #![proptest_config(config())]

    /// Random bytes as a protobuf message: decoding fails or yields a message
    /// whose check fails or passes, but nothing panics.
    #[test]
    fn random_bytes_never_panic_the_rollout_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(wire) = v1::Rollout::decode(bytes.as_slice()) {
            let _ = Rollout::try_from(&wire);
        }
    }

    /// Arbitrary field values: refused with a named kind, or accepted only when
    /// every shape rule holds.
    #[test]
    fn arbitrary_wire_rollouts_are_refused_or_well_formed(wire in any_wire()) {
        match Rollout::try_from(&wire) {
            Ok(r) => {
                prop_assert!(!r.prompt_tokens.is_empty());
                prop_assert_eq!(r.loss_mask.len(), r.response_tokens.len());
                if let Some(lp) = &r.logprobs {
                    prop_assert_eq!(lp.len(), r.response_tokens.len());
                    prop_assert!(lp.iter().all(|v| v.is_finite() && *v <= 0.0));
                }
                prop_assert!(r.reward.is_finite() && r.extrinsic.is_finite() && r.intrinsic.is_finite());
            }
            Err(e) => prop_assert!(!e.kind.is_empty() && !e.reason.is_empty()),
        }
    }

    /// What the actor encodes, the learner decodes to the same rollout, also
    /// after a trip through protobuf bytes.
    #[test]
    fn encode_then_decode_is_the_identity(r in any_rollout(), group_size in 1usize..64) {
        let at = Placement { job: "j", actor: "a", group_id: 3, group_size, work_id: 5, trace: "" };
        let wire = encode(&r, at, group_size - 1, None);
        let bytes = wire.encode_to_vec();
        let back = v1::Rollout::decode(bytes.as_slice()).unwrap();
        // An empty response has (vacuously) all its log-probs: the codec reads
        // "none" and "zero of them" alike there.
        let want = if r.response_tokens.is_empty() { Rollout { logprobs: Some(Vec::new()), ..r } } else { r };
        prop_assert_eq!(Rollout::try_from(&back).unwrap(), want);
    }

    /// Packed fields: ragged input is refused, whole input round-trips.
    #[test]
    fn packed_fields_round_trip_or_refuse(bytes in prop::collection::vec(any::<u8>(), 0..64), ids in prop::collection::vec(0i64..=u32::MAX as i64, 0..32)) {
        prop_assert_eq!(packed::tokens_from(&bytes).is_some(), bytes.len() % 4 == 0);
        prop_assert_eq!(packed::tokens_from(&packed::tokens(&ids)), Some(ids));
        prop_assert_eq!(packed::mask_from(&bytes).is_some(), bytes.iter().all(|&b| b <= 1));
    }

    /// Event lines (what Redis and `sluice logs --json` hold): any text parses
    /// or is refused, never panics; JSON of the right shape with junk values too.
    #[test]
    fn event_lines_never_panic(line in ".{0,200}", step in any::<i64>(), value in any::<f64>()) {
        let _ = events::from_json(&line);
        let _ = events::from_json(&format!("{{\"event\":\"step\",\"step\":{step},\"reward_mean\":{value}}}"));
        let _ = events::from_json(&format!("{{\"event\":\"round\",\"sizes\":[{step}],\"extra\":\"{}\"}}", line.escape_default()));
    }
}
