//! OpenTelemetry: a dev job with `OTEL_EXPORTER_OTLP_ENDPOINT` set delivers
//! spans and metrics from every process to a real OTLP/gRPC receiver.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{MetricsService, MetricsServiceServer};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::resource::v1::Resource;
use tonic::{Request, Response, Status};

use crate::sluice;

/// One span as received.
#[derive(Debug, Clone)]
struct Traced {
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    service: String,
    name: String,
    kind: i32,
    /// Trace ids of its links.
    links: Vec<Vec<u8>>,
}

/// (service.name, span or metric name) pairs received, and each service's
/// `service.instance.id`s.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<BTreeSet<(String, String)>>>,
    metrics: Arc<Mutex<BTreeSet<(String, String)>>>,
    instances: Arc<Mutex<BTreeSet<(String, String)>>>,
    labels: Arc<Mutex<BTreeSet<Labels>>>,
    /// Every span received.
    traced: Arc<Mutex<Vec<Traced>>>,
}

/// (service.name, service.namespace, sluice.role, sluice.rank, sluice.job) of a resource.
type Labels = (String, String, String, String, String);

impl Receiver {
    fn saw(&self, r: &Option<Resource>) -> String {
        let svc = service(r);
        self.instances.lock().unwrap().insert((svc.clone(), attribute(r, "service.instance.id")));
        let label = |k: &str| attribute(r, k);
        self.labels.lock().unwrap().insert((svc.clone(), label("service.namespace"), label("sluice.role"), label("sluice.rank"), label("sluice.job")));
        svc
    }
}

fn service(r: &Option<Resource>) -> String {
    attribute(r, "service.name")
}

fn attribute(r: &Option<Resource>, key: &str) -> String {
    r.as_ref()
        .and_then(|r| r.attributes.iter().find(|a| a.key == key))
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            AnyValue::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
        .unwrap_or_default()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(&self, r: Request<ExportTraceServiceRequest>) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut seen = self.spans.lock().unwrap();
        for rs in r.into_inner().resource_spans {
            let svc = self.saw(&rs.resource);
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let links = span.links.iter().map(|l| l.trace_id.clone()).collect();
                    self.traced.lock().unwrap().push(Traced {
                        trace: span.trace_id.clone(),
                        id: span.span_id.clone(),
                        parent: span.parent_span_id.clone(),
                        service: svc.clone(),
                        name: span.name.clone(),
                        kind: span.kind,
                        links,
                    });
                    seen.insert((svc.clone(), span.name));
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(&self, r: Request<ExportMetricsServiceRequest>) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut seen = self.metrics.lock().unwrap();
        for rm in r.into_inner().resource_metrics {
            let svc = self.saw(&rm.resource);
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    seen.insert((svc.clone(), m.name));
                }
            }
        }
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[test]
fn a_dev_job_exports_spans_and_metrics_over_otlp() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let receiver = Receiver::default();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = receiver.clone();
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(svc.clone()))
            .add_service(MetricsServiceServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });

    let dir = tempfile::tempdir().unwrap();
    let job = crate::job(dir.path(), 6, 5, "");
    let out = sluice()
        .args(["dev", job.to_str().unwrap(), "--json"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "500")
        .env("OTEL_SERVICE_NAME", "otel-run")
        .env("OMP_NUM_THREADS", "1")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "sluice dev failed");
    let job_id = crate::events(&out).iter().find(|v| v["event"] == "submitted").unwrap()["job"].as_str().unwrap().to_string();
    // Every process flushes on exit; the receiver has everything by now.
    let spans = receiver.spans.lock().unwrap().clone();
    let metrics = receiver.metrics.lock().unwrap().clone();
    for (svc, name) in [
        ("sluice-learner", "train_step"),
        ("sluice-actor", "sample_batch"),
        ("sluice-orchestrator", "next_work"),
        ("sluice-orchestrator", "report_outcome"),
        ("sluice-reward-server", "score"),
    ] {
        assert!(spans.contains(&(svc.to_string(), name.to_string())), "no span {name} from {svc}: {spans:?}");
    }
    for (svc, name) in [
        ("sluice-learner", "sluice.learner.steps"),
        ("sluice-learner", "sluice.learner.effective_gradient_ratio"),
        ("sluice-learner", "sluice.learner.step.duration"),
        ("sluice-actor", "sluice.actor.generate.duration"),
        ("sluice-actor", "sluice.actor.rollouts_sent"),
        ("sluice-orchestrator", "sluice.orchestrator.work_completed"),
        ("sluice-reward-server", "sluice.reward.items_scored"),
    ] {
        assert!(metrics.contains(&(svc.to_string(), name.to_string())), "no metric {name} from {svc}: {metrics:?}");
    }
    // Trace context crosses processes: each work item is a trace holding the
    // actor's `work_item` span, the reward server's Score call and the
    // orchestrator's ReportOutcome call for it (SERVER spans named
    // package.Service/Method), linked to the actor batch that sampled it.
    let traced = receiver.traced.lock().unwrap().clone();
    const SERVER: i32 = 2;
    const CLIENT: i32 = 3;
    let in_trace = |t: &Vec<u8>, svc: &str, name: &str, kind: Option<i32>| {
        traced.iter().any(|s| &s.trace == t && s.service == svc && s.name == name && kind.is_none_or(|kind| s.kind == kind))
    };
    let batches: Vec<&Vec<u8>> =
        traced.iter().filter(|s| s.service == "sluice-actor" && s.name == "actor_batch").map(|s| &s.trace).collect();
    assert!(!batches.is_empty(), "no actor_batch span");
    assert!(batches.iter().any(|t| in_trace(t, "sluice-actor", "sample_batch", None)), "no batch trace holds its sampling");
    let items: Vec<&Traced> = traced.iter().filter(|s| s.service == "sluice-actor" && s.name == "work_item").collect();
    assert!(!items.is_empty(), "no work_item span");
    let whole = |i: &&Traced| {
        in_trace(&i.trace, "sluice-reward-server", "sluice.v1.Reward/Score", Some(SERVER))
            && in_trace(&i.trace, "sluice-orchestrator", "sluice.v1.Orchestrator/ReportOutcome", Some(SERVER))
            && i.links.iter().any(|l| batches.contains(&l))
    };
    assert!(items.iter().any(whole), "no work item trace holds its Score and ReportOutcome calls and links to its batch: {items:?}");
    // One trace per work item: no two items share one.
    let mut item_traces: Vec<&Vec<u8>> = items.iter().map(|i| &i.trace).collect();
    item_traces.sort();
    item_traces.dedup();
    assert_eq!(item_traces.len(), items.len());
    // Each call is a CLIENT span in the caller, parent of the SERVER span in the callee.
    for (caller, callee, call) in [
        ("sluice-actor", "sluice-reward-server", "sluice.v1.Reward/Score"),
        ("sluice-actor", "sluice-orchestrator", "sluice.v1.Orchestrator/NextWork"),
        ("sluice-actor", "sluice-learner", "sluice.v1.Learner/GetWeights"),
        ("sluice-learner", "sluice-orchestrator", "sluice.v1.Orchestrator/ReportEvents"),
    ] {
        let clients: Vec<&Traced> = traced.iter().filter(|s| s.service == caller && s.name == call && s.kind == CLIENT).collect();
        assert!(!clients.is_empty(), "no CLIENT span {call} from {caller}");
        assert!(
            traced.iter().any(|s| s.service == callee && s.name == call && s.kind == SERVER && clients.iter().any(|c| c.id == s.parent)),
            "no SERVER span {call} in {callee} whose parent is the {caller}'s CLIENT span"
        );
    }
    // The learner's steps link to the work items whose groups they trained.
    let steps: Vec<&Traced> = traced.iter().filter(|s| s.service == "sluice-learner" && s.name == "train_step").collect();
    assert!(
        steps.iter().any(|s| !s.links.is_empty() && s.links.iter().all(|l| item_traces.contains(&l))),
        "no train_step span links to work items: {steps:?}"
    );
    // Every process names itself: one non-empty instance id per role here (one of each).
    let instances = receiver.instances.lock().unwrap().clone();
    for svc in ["sluice-learner", "sluice-actor", "sluice-orchestrator", "sluice-reward-server"] {
        let ids: Vec<_> = instances.iter().filter(|(s, _)| s == svc).map(|(_, id)| id.clone()).collect();
        assert!(ids.len() == 1 && !ids[0].is_empty(), "{svc}: instance ids {ids:?}");
    }
    // OTEL_SERVICE_NAME given to `sluice dev` names the run (service.namespace),
    // not every process; each resource says its role, rank and (workers) job.
    let labels = receiver.labels.lock().unwrap().clone();
    for (svc, role, job) in [
        ("sluice-learner", "learner", job_id.as_str()),
        ("sluice-actor", "actor", job_id.as_str()),
        ("sluice-reward-server", "reward", job_id.as_str()),
        ("sluice-orchestrator", "orchestrator", ""),
    ] {
        let want = (svc.to_string(), "otel-run".to_string(), role.to_string(), "0".to_string(), job.to_string());
        assert!(labels.contains(&want), "{want:?} not among {labels:?}");
    }
}

/// An unreachable collector is said once per process and signal, with the
/// endpoint, and the job still runs to the end.
#[test]
fn an_unreachable_collector_is_logged_once() {
    let port = sluice_testkit::free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let job = crate::job(dir.path(), 6, 5, "");
    let out = sluice()
        .args(["dev", job.to_str().unwrap(), "--json"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "300")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "200")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "sluice dev failed: {}", String::from_utf8_lossy(&out.stderr));
    let log = std::fs::read_to_string(dir.path().join("run/logs/learner-0.log")).unwrap();
    for signal in ["traces", "metrics"] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(&format!("OTLP export of {signal} failed"))).collect();
        assert_eq!(lines.len(), 1, "{signal}: {lines:?}");
        assert!(lines[0].contains(&endpoint), "{}", lines[0]);
    }
}
