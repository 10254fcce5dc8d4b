//! A future polled only when it asked to be. A task that selects over its
//! connection and a shutdown signal polls every branch on every wake-up, and a
//! waiting `watch` or `Notify` takes a lock shared by all connections each time
//! it is polled: once per request per connection, on every worker. Behind
//! `OnWake` the signal is polled only after its own waker fired; the other
//! wake-ups cost one atomic swap on the connection's own cache line.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

pin_project_lite::pin_project! {
    pub struct OnWake<F> {
        #[pin]
        inner: F,
        flag: Arc<Flag>,
    }
}

struct Flag {
    /// The inner future's waker fired since it was last polled (set at first).
    woken: AtomicBool,
    /// The task polling this.
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F> OnWake<F> {
    pub fn new(inner: F) -> Self {
        Self { inner, flag: Arc::new(Flag { woken: AtomicBool::new(true), task: AtomicWaker::new() }) }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(this.flag.clone());
        this.inner.poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Counts its polls; ready once `open` is set, waking through the waker it last saw.
    struct Gate {
        polls: Arc<AtomicUsize>,
        open: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Gate {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.open.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn polled_only_after_its_own_wake_and_then_ready() {
        let (polls, open, waker) = Default::default();
        let gate = Gate { polls: Arc::clone(&polls), open: Arc::clone(&open), waker: Arc::clone(&waker) };
        let mut f = std::pin::pin!(OnWake::new(gate));
        let noop = &mut Context::from_waker(Waker::noop());
        for _ in 0..5 {
            assert!(f.as_mut().poll(noop).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1, "other wake-ups do not reach it");
        open.store(true, Ordering::SeqCst);
        assert!(f.as_mut().poll(noop).is_pending(), "not woken yet");
        waker.lock().unwrap().take().unwrap().wake();
        assert!(f.as_mut().poll(noop).is_ready(), "polled after its wake");
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_watch_signal_still_ends_the_wait() {
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let wait = OnWake::new(async move {
            let _ = rx.wait_for(|v| *v).await;
        });
        let task = tokio::spawn(wait);
        tokio::task::yield_now().await;
        tx.send(true).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), task).await.unwrap().unwrap();
    }
}
