//! Job events in their JSON form: the orchestrator stores them as JSON lines,
//! `sluice logs --json` prints them. The JSON object is the body's fields plus
//! `"event": "<name>"` (`step`, `sft`, `eval`, `checkpoint`, `submitted`,
//! `state`, `round`, `worker`, `worker_lost`, `redispatched`, `work`), and the store
//! adds `unix_ms`; unknown fields are ignored when read back.

use serde::Deserialize;

use crate::v1::{self, event::Body};

/// The JSON line of an event (`None` for an event without a body).
pub fn to_json(e: &v1::Event, unix_ms: Option<u64>) -> Option<String> {
    let mut v = serde_json::to_value(e.body.as_ref()?).ok()?;
    if let (Some(ms), Some(o)) = (unix_ms, v.as_object_mut()) {
        o.insert("unix_ms".into(), ms.into());
    }
    Some(v.to_string())
}

/// An event from its JSON line.
pub fn from_json(line: &str) -> Result<v1::Event, String> {
    let body: Body = serde_json::from_str(line).map_err(|e| format!("not a sluice event: {e}"))?;
    Ok(v1::Event { body: Some(body) })
}

/// `body` as an event.
pub fn event(body: Body) -> v1::Event {
    v1::Event { body: Some(body) }
}

/// Reads a float that JSON may have as `null` (how serde_json writes NaN).
pub fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_keep_their_json_form() {
        let step = event(Body::Step(v1::TrainStep { step: 3, reward_mean: 0.5, grad_norm: f64::NAN, ..Default::default() }));
        let line = to_json(&step, Some(7)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!((v["event"].as_str(), v["step"].as_u64(), v["unix_ms"].as_u64()), (Some("step"), Some(3), Some(7)));
        assert!(v["grad_norm"].is_null());
        let Some(Body::Step(back)) = from_json(&line).unwrap().body else { panic!("a step") };
        assert_eq!((back.step, back.reward_mean), (3, 0.5));
        assert!(back.grad_norm.is_nan());
        let lost = from_json(r#"{"event":"worker_lost","worker":"w1","unix_ms":5}"#).unwrap();
        assert_eq!(lost.body, Some(Body::WorkerLost(v1::WorkerLost { worker: "w1".into() })));
        assert!(from_json(r#"{"event":"nope"}"#).is_err());
        assert!(from_json(r#"{"x":1}"#).is_err());
    }
}
