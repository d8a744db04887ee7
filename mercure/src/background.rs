//! A thread at the lowest CPU priority, for the work a subscriber may ask of the hub that takes
//! seconds: reading the whole history through a thousand templates. On a machine that the
//! pipeline keeps busy, that work gets only the CPU the rest leaves, instead of a fair share of
//! it (the scheduler would give a third of two cores to one more busy thread).
//!
//! Linux's `SCHED_IDLE` policy does it: a thread may take it without privileges, it is below
//! any nice value, and it is never starved outright (the scheduler still gives it a small
//! share). It cannot be left again without privileges, hence a thread of its own rather than
//! one of the runtime's blocking pool.

use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

/// The thread and its queue. The thread ends when this is dropped and its queue is done.
#[derive(Debug)]
pub(crate) struct Background {
    jobs: mpsc::Sender<Job>,
}

/// The work panicked (the thread goes on with the next), or the thread could not take it.
#[derive(Debug, thiserror::Error)]
#[error("the hub's background work failed")]
pub(crate) struct Failed;

impl Background {
    pub(crate) fn start(name: &str) -> std::io::Result<Background> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                lowest_priority();
                for job in queue {
                    // A panic fails that job only: its caller sees its answer dropped.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })?;
        Ok(Background { jobs })
    }

    /// Runs `work` on the thread, after what is queued before it.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Failed> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = done.send(work());
            }))
            .map_err(|_| Failed)?;
        result.await.map_err(|_| Failed)
    }
}

#[cfg(target_os = "linux")]
fn lowest_priority() {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    if let Err(error) = set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    ) {
        tracing::warn!(
            ?error,
            "could not lower the priority of the hub's background thread; \
             large subscriptions compete with the pipeline for the CPU"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn lowest_priority() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_work_in_order_on_an_idle_priority_thread() {
        let background = Background::start("test-background").unwrap();
        let policy = background
            .run(|| {
                std::fs::read_to_string("/proc/thread-self/sched")
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find(|l| l.starts_with("policy"))
                            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
                    })
            })
            .await
            .unwrap();
        if cfg!(target_os = "linux") {
            // SCHED_IDLE is 5.
            assert_eq!(policy.as_deref(), Some("5"));
        }
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let runs: Vec<_> = (0..10)
            .map(|i| {
                let order = order.clone();
                background.run(move || order.lock().unwrap().push(i))
            })
            .collect();
        futures::future::join_all(runs).await;
        assert_eq!(*order.lock().unwrap(), (0..10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_panicking_job_fails_alone() {
        let background = Background::start("test-background").unwrap();
        assert!(background.run(|| panic!("boom")).await.is_err());
        assert_eq!(background.run(|| 1).await.unwrap(), 1);
    }
}
