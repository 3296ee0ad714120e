//! The orchestrator library over a real `redis-server`: what a restart keeps
//! (jobs, outstanding work, outcome history, events) and what lease expiry does.
//! Driven through [`Orchestrator`] directly, as the gRPC handlers call it.

use std::time::Duration;

use serde_json::Value;
use sluice_orchestrator::service::{now_ms, Orchestrator};
use sluice_orchestrator::store::Store;
use sluice_orchestrator::Error;
use sluice_proto::v1;
use sluice_testkit::Redis;

/// 32 prompts in rounds of 16 (a prompt comes round every other round), staleness
/// 0 so rounds follow each other strictly, knapsack budgets from 4 outcomes on.
const SPEC: &str = "name = \"ks\"\n[model]\npreset = \"tiny\"\n[task]\nkind = \"arithmetic\"\ntrain_size = 32\n\
    [grpo]\ngroup_size = 8\n[train]\nprompts_per_step = 16\n[rollout]\nmax_staleness = 0\n\
    [budget]\nstrategy = \"knapsack\"\nmin_outcomes = 4\n";

/// A fixed outcome per prompt: success rate (prompt_index mod 5) / 4, so the
/// knapsack sees rates 0, 1/4, 1/2, 3/4 and 1.
fn rewards(prompt_index: u64, n: u32) -> Vec<f64> {
    (0..n as u64).map(|j| if j % 4 < prompt_index % 5 { 1.0 } else { 0.0 }).collect()
}

async fn register(o: &Orchestrator, job: &str, name: &str) -> String {
    let req = v1::RegisterWorkerRequest { job_id: job.into(), role: "actor".into(), name: name.into(), address: String::new(), rank: 0 };
    o.register(req).await.unwrap().worker_id
}

async fn next_work(o: &Orchestrator, job: &str, worker: &str) -> Vec<v1::WorkItem> {
    let req = v1::NextWorkRequest { job_id: job.into(), worker_id: worker.into(), max_items: 4096 };
    o.next_work(req).await.unwrap().items
}

async fn report(o: &Orchestrator, job: &str, worker: &str, item: &v1::WorkItem) -> bool {
    let req = v1::ReportOutcomeRequest {
        job_id: job.into(),
        worker_id: worker.into(),
        work_id: item.id,
        rewards: rewards(item.prompt_index, item.n),
    };
    o.report_outcome(req).await.unwrap()
}

/// Takes and completes `rounds` whole rounds; after each, the learner reports
/// the step that trained it (the next round opens only then).
async fn drive(o: &Orchestrator, job: &str, worker: &str, rounds: usize) {
    for _ in 0..rounds {
        let items = next_work(o, job, worker).await;
        assert_eq!(items.len(), 16, "one round at a time at staleness 0");
        for item in &items {
            assert!(report(o, job, worker, item).await);
        }
        let step = o.get(job).await.unwrap().progress.unwrap().step + 1;
        let hb = v1::HeartbeatRequest { worker_id: worker.into(), job_id: job.into(), step, ..Default::default() };
        o.heartbeat(hb).await.unwrap();
    }
}

/// Each `round` event's budgets, in order.
async fn round_sizes(o: &Orchestrator, job: &str) -> Vec<Vec<u64>> {
    let (events, _) = o.events(job, 0).await.unwrap();
    events
        .iter()
        .map(|(_, json)| serde_json::from_str::<Value>(json).unwrap())
        .filter(|v| v["event"] == "round")
        .map(|v| v["sizes"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect())
        .collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

const LEASE: Duration = Duration::from_secs(30);

/// An orchestrator killed after four rounds and reopened on the same Redis hands
/// out exactly the rounds an uninterrupted one does: the knapsack history, the
/// data cursor, the counters and the events all came back.
#[test]
fn a_restart_on_redis_continues_with_the_same_knapsack_budgets() {
    let redis = Redis::start();
    rt().block_on(async {
        // Reference: one orchestrator, never restarted.
        let a = Orchestrator::open(Store::open("memory").await.unwrap(), LEASE).await.unwrap();
        let ja = a.submit(SPEC.into()).await.unwrap().id;
        let wa = register(&a, &ja, "a").await;
        drive(&a, &ja, &wa, 8).await;
        next_work(&a, &ja, &wa).await; // opens round 8
        let want = round_sizes(&a, &ja).await;

        let b = Orchestrator::open(Store::open(&redis.url).await.unwrap(), LEASE).await.unwrap();
        let jb = b.submit(SPEC.into()).await.unwrap().id;
        let wb = register(&b, &jb, "b").await;
        drive(&b, &jb, &wb, 4).await;
        let before = b.get(&jb).await.unwrap();
        drop(b);

        let b = Orchestrator::open(Store::open(&redis.url).await.unwrap(), LEASE).await.unwrap();
        let after = b.get(&jb).await.unwrap();
        assert_eq!(after.progress, before.progress, "counters survive the restart");
        assert_eq!(round_sizes(&b, &jb).await, want[..4].to_vec(), "events survive the restart");
        let wb = register(&b, &jb, "b2").await;
        drive(&b, &jb, &wb, 4).await;
        next_work(&b, &jb, &wb).await;
        let got = round_sizes(&b, &jb).await;
        assert_eq!(got, want, "rounds after the restart differ from the uninterrupted run's");
        // Round 4 reuses round 2's prompts, whose outcomes came before the
        // restart: only a restored history makes it non-uniform.
        assert!(got[4].iter().any(|&n| n != 8), "round 4 is uniform: the history was lost: {got:?}");
        assert!(got.iter().all(|r| r.iter().sum::<u64>() == 16 * 8), "every round keeps the total: {got:?}");
        let p = b.get(&jb).await.unwrap().progress.unwrap();
        assert_eq!(p.work_created, 9 * 16);
        assert_eq!(p.work_completed, 8 * 16);
        assert_eq!(p.work_created, p.work_completed + p.work_outstanding, "{p:?}");
    });
}

/// A worker whose lease runs out loses its items to the next worker (same ids,
/// next attempt); it must register again, and its late outcome is a duplicate.
/// Workers and outstanding items are in Redis, so a restart in the middle
/// changes none of it.
#[test]
fn expired_leases_requeue_work_and_the_worker_must_register_again() {
    let redis = Redis::start();
    rt().block_on(async {
        let o = Orchestrator::open(Store::open(&redis.url).await.unwrap(), LEASE).await.unwrap();
        let job = o.submit(SPEC.into()).await.unwrap().id;
        let w1 = register(&o, &job, "first").await;
        let held = next_work(&o, &job, &w1).await;
        assert_eq!(held.len(), 16);
        assert!(held.iter().all(|i| i.attempt == 0));
        // Nothing expires while the lease is alive; then it runs out.
        assert_eq!(o.sweep(now_ms()).await.unwrap(), 0);
        assert_eq!(o.sweep(now_ms() + LEASE.as_millis() as u64 + 1).await.unwrap(), 1, "the lease runs out");
        let redispatched = o.get(&job).await.unwrap().progress.unwrap().work_redispatched;
        assert_eq!(redispatched, 16);
        drop(o);
        // After a restart the expired worker is still forgotten and its items still queued.
        let o = Orchestrator::open(Store::open(&redis.url).await.unwrap(), LEASE).await.unwrap();
        let hb = v1::HeartbeatRequest { worker_id: w1.clone(), job_id: job.clone(), ..Default::default() };
        assert!(matches!(o.heartbeat(hb).await, Err(Error::NotFound(_))), "an expired worker must register again");

        let w2 = register(&o, &job, "second").await;
        let again = next_work(&o, &job, &w2).await;
        let ids = |v: &[v1::WorkItem]| v.iter().map(|i| (i.id, i.prompt_index, i.n)).collect::<Vec<_>>();
        assert_eq!(ids(&again), ids(&held), "the same items, handed out again");
        assert!(again.iter().all(|i| i.attempt >= 1), "{again:?}");
        for item in &again {
            assert!(report(&o, &job, &w2, item).await, "the first outcome counts");
        }
        assert!(!report(&o, &job, &w1, &held[0]).await, "a late outcome of the expired worker is a duplicate");
        let p = o.get(&job).await.unwrap().progress.unwrap();
        assert_eq!((p.work_completed, p.duplicate_outcomes, p.work_outstanding), (16, 1, 0), "{p:?}");
        assert_eq!(p.work_redispatched, 16, "{p:?}");
        let (events, _) = o.events(&job, 0).await.unwrap();
        assert!(events.iter().any(|(_, e)| e.contains("\"worker_lost\"") && e.contains(&w1)), "worker_lost event");
    });
}

#[test]
fn oversized_names_are_refused_and_echoed_ids_are_clipped() {
    rt().block_on(async {
        let o = Orchestrator::open(Store::open("memory").await.unwrap(), LEASE).await.unwrap();
        let job = o.submit(SPEC.into()).await.unwrap().id;
        let huge = "x".repeat(1 << 20);
        let req = v1::RegisterWorkerRequest { job_id: job.clone(), role: "actor".into(), name: huge.clone(), address: String::new(), rank: 0 };
        match o.register(req).await {
            Err(Error::Invalid(m)) => assert!(m.contains("name") && m.len() < 200, "{m}"),
            other => panic!("a 1 MiB name must be refused, got {other:?}"),
        }
        // An unknown id comes back in the error, cut short.
        let status = tonic::Status::from(o.get(&huge).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(status.message().len() < 200, "{} bytes echoed", status.message().len());
        // Nothing of the refused worker stayed.
        assert_eq!(o.get(&job).await.unwrap().progress.unwrap().live_workers, 0);
    });
}

#[test]
fn an_oversized_job_file_is_refused_before_it_costs_anything() {
    rt().block_on(async {
        let o = Orchestrator::open(Store::open("memory").await.unwrap(), LEASE).await.unwrap();
        let huge = format!("{SPEC}# {}\n", "x".repeat(sluice_core::limits::MAX_JOB_FILE_BYTES));
        match o.submit(huge).await {
            Err(Error::Core(sluice_core::Error::Config { path, .. })) => assert_eq!(path, "(file)"),
            other => panic!("a job file over the limit must be refused, got {other:?}"),
        }
        assert!(o.list(0, "").await.unwrap().0.is_empty(), "nothing was stored");
        // The next job still gets the first number.
        assert!(o.submit(SPEC.into()).await.unwrap().id.ends_with("-1"));
    });
}

/// Redis killed with SIGKILL, then started again on its append-only file:
/// while it is down every call fails UNAVAILABLE within seconds (no hang);
/// the work a failed `NextWork` made in memory is thrown away (Redis never
/// had it); once Redis is back the orchestrator reconnects by itself, reads
/// its state back and the job goes on with every count intact.
#[test]
fn a_redis_outage_fails_calls_unavailable_and_keeps_only_what_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start_durable(dir.path());
    rt().block_on(async {
        let o = Orchestrator::open(Store::open(&redis.url).await.unwrap(), LEASE).await.unwrap();
        let job = o.submit(SPEC.into()).await.unwrap().id;
        let w = register(&o, &job, "a").await;
        drive(&o, &job, &w, 2).await;
        let before = o.get(&job).await.unwrap().progress.unwrap();

        redis.kill9();
        let unavailable = |e: Error| {
            let s = tonic::Status::from(e);
            assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
        };
        let t = std::time::Instant::now();
        let req = v1::NextWorkRequest { job_id: job.clone(), worker_id: w.clone(), max_items: 4096 };
        unavailable(o.next_work(req).await.unwrap_err());
        // Memory now holds a dispatched round that Redis never saw: nothing is
        // answered from it.
        unavailable(o.get(&job).await.unwrap_err());
        unavailable(o.submit(SPEC.into()).await.unwrap_err());
        assert!(t.elapsed() < Duration::from_secs(15), "calls hung for {:?} while Redis was down", t.elapsed());

        redis.restart();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let after = loop {
            match o.get(&job).await {
                Ok(j) => break j.progress.unwrap(),
                Err(e) => assert!(std::time::Instant::now() < deadline, "no reconnect within 30 s: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(after, before, "the state after the outage is the durable state before it");
        // The job goes on: the next rounds are the ones the failed call had taken.
        drive(&o, &job, &w, 2).await;
        let p = o.get(&job).await.unwrap().progress.unwrap();
        assert_eq!((p.work_created, p.work_completed, p.work_outstanding), (4 * 16, 4 * 16, 0), "{p:?}");
        assert_eq!(p.duplicate_outcomes, 0, "{p:?}");
        assert_eq!(o.list(0, "").await.unwrap().0.len(), 1, "the submit that failed left no job");
    });
}

/// `ListJobs` pages through summaries (no spec) newest first, each job once;
/// `DeleteJob` refuses a running job and forgets an ended one everywhere,
/// Redis included, so a restarted orchestrator does not bring it back.
#[test]
fn jobs_list_in_pages_and_ended_jobs_can_be_deleted() {
    let redis = Redis::start();
    rt().block_on(async {
        let o = Orchestrator::open(Store::open(&redis.url).await.unwrap(), LEASE).await.unwrap();
        let mut ids = Vec::new();
        for _ in 0..7 {
            ids.push(o.submit(SPEC.into()).await.unwrap().id);
        }
        let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let (page, next) = o.list(3, &token).await.unwrap();
            assert!(page.len() <= 3);
            assert!(page.iter().all(|j| j.spec_toml.is_empty() && j.progress.is_some()), "summaries only");
            seen.extend(page.into_iter().map(|j| j.id));
            pages += 1;
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(pages, 3);
        let mut want = ids.clone();
        want.sort_by_key(|id| std::cmp::Reverse(id.rsplit('-').next().unwrap().parse::<u64>().unwrap()));
        let mut got = seen.clone();
        got.sort_by_key(|id| std::cmp::Reverse(id.rsplit('-').next().unwrap().parse::<u64>().unwrap()));
        assert_eq!(got, want, "every job exactly once");
        assert!(matches!(o.list(3, "garbage").await, Err(Error::Invalid(_))));

        let victim = &ids[2];
        let w = register(&o, victim, "a").await;
        next_work(&o, victim, &w).await;
        assert!(matches!(o.delete(victim).await, Err(Error::Precondition(m)) if m.contains("cancel it first")));
        o.cancel(victim, "").await.unwrap();
        o.delete(victim).await.unwrap();
        assert!(matches!(o.get(victim).await, Err(Error::NotFound(_))));
        assert!(matches!(o.delete(victim).await, Err(Error::NotFound(_))));
        assert_eq!(o.list(0, "").await.unwrap().0.len(), 6);
        drop(o);
        let o = Orchestrator::open(Store::open(&redis.url).await.unwrap(), LEASE).await.unwrap();
        assert!(matches!(o.get(victim).await, Err(Error::NotFound(_))), "a deleted job stays deleted after a restart");
        assert_eq!(o.list(0, "").await.unwrap().0.len(), 6);
        // Nothing of it is left in Redis.
        let client = redis::Client::open(redis.url.as_str()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("*{victim}*")).query_async(&mut c).await.unwrap();
        assert!(keys.is_empty(), "{keys:?}");
    });
}

/// Two orchestrators on one Redis under different prefixes keep separate jobs
/// (and job numbers); each finds its own after a restart.
#[test]
fn orchestrators_sharing_a_redis_keep_apart_by_prefix() {
    let redis = Redis::start();
    rt().block_on(async {
        let a = Orchestrator::open(Store::open_prefixed(&redis.url, "team-a").await.unwrap(), LEASE).await.unwrap();
        let b = Orchestrator::open(Store::open_prefixed(&redis.url, "team-b").await.unwrap(), LEASE).await.unwrap();
        let ja = a.submit(SPEC.into()).await.unwrap().id;
        let jb = b.submit(SPEC.into()).await.unwrap().id;
        assert_eq!((ja.as_str(), jb.as_str()), ("ks-1", "ks-1"), "each prefix numbers its own jobs");
        a.cancel(&ja, "only a's").await.unwrap();
        drop((a, b));
        let b = Orchestrator::open(Store::open_prefixed(&redis.url, "team-b").await.unwrap(), LEASE).await.unwrap();
        let job = b.get(&jb).await.unwrap();
        assert_eq!(job.state, v1::JobState::Queued as i32, "team-a's cancel did not touch team-b's job");
        assert_eq!(b.list(0, "").await.unwrap().0.len(), 1);
        assert!(matches!(Store::open_prefixed(&redis.url, "has space").await, Err(Error::Invalid(_))));
    });
}

/// Many calls at once on four jobs (each call locks only its job across its
/// Redis write): every job's counts add up, and a restart reads back exactly
/// what memory held.
#[test]
fn concurrent_calls_on_many_jobs_keep_every_count_and_match_redis() {
    let redis = Redis::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    rt.block_on(async {
        let o = std::sync::Arc::new(Orchestrator::open(Store::open(&redis.url).await.unwrap(), LEASE).await.unwrap());
        let mut tasks = Vec::new();
        let mut jobs = Vec::new();
        for j in 0..4 {
            let job = o.submit(SPEC.into()).await.unwrap().id;
            jobs.push(job.clone());
            for w in 0..2 {
                let (o, job) = (o.clone(), job.clone());
                tasks.push(tokio::spawn(async move {
                    let worker = register(&o, &job, &format!("w{j}{w}")).await;
                    for _ in 0..6 {
                        let req = v1::NextWorkRequest { job_id: job.clone(), worker_id: worker.clone(), max_items: 8 };
                        for item in o.next_work(req).await.unwrap().items {
                            assert!(report(&o, &job, &worker, &item).await);
                        }
                        o.get(&job).await.unwrap();
                        o.list(0, "").await.unwrap();
                    }
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut before = Vec::new();
        for job in &jobs {
            let p = o.get(job).await.unwrap().progress.unwrap();
            assert_eq!(p.work_created, p.work_completed + p.work_outstanding, "{p:?}");
            assert!(p.work_completed >= 16 && p.duplicate_outcomes == 0, "{p:?}");
            before.push(p);
        }
        drop(o);
        let o = Orchestrator::open(Store::open(&redis.url).await.unwrap(), LEASE).await.unwrap();
        for (job, want) in jobs.iter().zip(before) {
            assert_eq!(o.get(job).await.unwrap().progress.unwrap(), want, "{job}: Redis holds what memory held");
        }
    });
}
