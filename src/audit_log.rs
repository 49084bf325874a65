//! The audit log: one JSON line on stdout per tunnel, per WebSocket session and per issued
//! ticket, queued in memory and written by a thread of its own.
//!
//! Written in place, a reader of stdout that stalls (a container runtime's log pipe, a `| less`)
//! would block the writing thread in write(2) once the pipe's 64 KiB were full: a proxy worker,
//! and with it every tunnel on that worker, or an engine API request. So the queue is bounded,
//! and a line that finds it full is dropped and counted (`*_audit_lines_dropped_total`); once
//! stdout takes lines again, a line saying how many were lost is written where they would have
//! been. Lines that arrive within `BATCH_DELAY` of the first share one write(2), so a busy proxy
//! writes a few times per second instead of once per tunnel. (tracing-appender's non-blocking
//! writer queues too, but wakes its thread and writes once per line.)

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

/// How many bytes of lines may wait for stdout: about 5,000 tunnel lines.
pub const CAPACITY: usize = 1 << 20;
/// How long the writer waits after the first line of a batch for more to join it.
const BATCH_DELAY: Duration = Duration::from_millis(5);

/// A bounded queue of lines and the thread that writes them out.
pub struct Sink {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// A line arrived for a writer waiting on an empty queue.
    arrived: Condvar,
    /// The writer wrote everything it had and found the queue empty.
    drained: Condvar,
    capacity: usize,
    dropped: Counter,
}

#[derive(Default)]
struct State {
    queue: Vec<u8>,
    /// The writer is waiting for `arrived`: the first line of a batch must wake it.
    waiting: bool,
    /// The writer holds lines it has not finished writing.
    writing: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Sink {
    /// Starts the writer thread; at most `capacity` bytes of lines wait for `out`.
    pub fn new(out: impl Write + Send + 'static, capacity: usize) -> std::io::Result<Sink> {
        let shared = Arc::new(Shared { state: Mutex::default(), arrived: Condvar::new(), drained: Condvar::new(), capacity, dropped: Counter::default() });
        let writer = shared.clone();
        std::thread::Builder::new().name("audit-log".into()).spawn(move || write_batches(&writer, out))?;
        Ok(Sink { shared })
    }

    /// Queues `line` (without its newline) and returns at once: dropped and counted when the
    /// queue is full.
    pub fn line(&self, line: &[u8]) {
        let mut state = self.shared.lock();
        if state.queue.len() + line.len() + 1 > self.shared.capacity {
            drop(state);
            self.shared.dropped.inc();
            return;
        }
        state.queue.extend_from_slice(line);
        state.queue.push(b'\n');
        let wake = std::mem::take(&mut state.waiting);
        drop(state);
        if wake {
            self.shared.arrived.notify_one();
        }
    }

    /// Waits until every line queued so far was written, for at most `within`; false if they
    /// were not (stdout still blocked).
    pub fn flush(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut state = self.shared.lock();
        while !state.queue.is_empty() || state.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self.shared.drained.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        true
    }

    /// Lines dropped so far (a shared handle, for a metrics registry).
    pub fn dropped(&self) -> Counter {
        self.shared.dropped.clone()
    }
}

fn write_batches(shared: &Shared, mut out: impl Write) {
    let mut reported = 0;
    loop {
        let mut state = shared.lock();
        while state.queue.is_empty() {
            state.writing = false;
            shared.drained.notify_all();
            state.waiting = true;
            state = shared.arrived.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        state.writing = true;
        drop(state);
        std::thread::sleep(BATCH_DELAY);
        let mut batch = std::mem::take(&mut shared.lock().queue);
        let lines = batch.iter().filter(|b| **b == b'\n').count() as u64;
        // The notice follows this batch: the drops it counts came once its lines filled the
        // queue (a shorter line may still have fitted after a longer one was refused).
        let dropped = shared.dropped.get();
        if dropped > reported {
            batch.extend_from_slice(format!("{{\"event\":\"auditLinesDropped\",\"count\":{},\"reason\":\"stdout did not take the lines as fast as they came\"}}\n", dropped - reported).as_bytes());
            reported = dropped;
        }
        if out.write_all(&batch).and_then(|()| out.flush()).is_err() {
            // stdout is gone (a closed pipe): nobody will read these either.
            shared.dropped.inc_by(lines);
            reported += lines;
        }
    }
}

static STDOUT: OnceLock<Sink> = OnceLock::new();

/// The process's audit log on stdout, its thread started on first use.
pub fn stdout() -> &'static Sink {
    STDOUT.get_or_init(|| Sink::new(std::io::stdout(), CAPACITY).expect("cannot start the audit log's thread"))
}

/// Before the process exits: writes what is queued, waiting at most `within`.
pub fn flush_stdout(within: Duration) {
    if let Some(sink) = STDOUT.get() {
        sink.flush(within);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Takes writes into `written` only while its gate is open: a reader of stdout that stalls.
    #[derive(Clone, Default)]
    struct Stalled {
        open: Arc<(Mutex<bool>, Condvar)>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Stalled {
        fn open(&self) {
            *self.open.0.lock().unwrap() = true;
            self.open.1.notify_all();
        }
        fn text(&self) -> String {
            String::from_utf8(self.written.lock().unwrap().clone()).unwrap()
        }
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, opened) = &*self.open;
            drop(opened.wait_while(open.lock().unwrap(), |open| !*open).unwrap());
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs `f` on a thread of its own and fails if it does not return within 5 s.
    fn within_5s(f: impl FnOnce() + Send + 'static) {
        let (done_tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = done_tx.send(());
        });
        done.recv_timeout(Duration::from_secs(5)).expect("returned at once, never blocked by the stalled output");
    }

    #[test]
    fn a_stalled_output_never_blocks_a_writer_and_lost_lines_are_counted_where_they_were_lost() {
        let out = Stalled::default();
        let sink = Arc::new(Sink::new(out.clone(), 100).unwrap());
        // The writer takes the first line and blocks writing it.
        sink.line(b"first");
        std::thread::sleep(BATCH_DELAY * 4);
        // Ten lines of 19 bytes with their newlines (190 for a queue of 100): five fit, five are lost.
        let writer = sink.clone();
        within_5s(move || (0..10).for_each(|i| writer.line(format!("line {i:02} of the ten").as_bytes())));
        assert_eq!(sink.dropped().get(), 5);
        assert!(!sink.flush(Duration::from_millis(50)), "nothing can be written while the output is stalled");
        out.open();
        assert!(sink.flush(Duration::from_secs(5)));
        let expected: Vec<String> = std::iter::once("first".to_string())
            .chain((0..5).map(|i| format!("line {i:02} of the ten")))
            .chain(std::iter::once(r#"{"event":"auditLinesDropped","count":5,"reason":"stdout did not take the lines as fast as they came"}"#.to_string()))
            .collect();
        assert_eq!(out.text().lines().collect::<Vec<_>>(), expected);
        // Once stdout flows again, new lines get through and nothing more is reported lost.
        sink.line(b"after");
        assert!(sink.flush(Duration::from_secs(5)));
        assert!(out.text().ends_with("came\"}\nafter\n"), "{}", out.text());
        assert_eq!(sink.dropped().get(), 5);
    }

    #[test]
    fn lines_arriving_together_share_one_write() {
        #[derive(Clone, Default)]
        struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);
        impl Write for Writes {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().push(buf.to_vec());
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Writes::default();
        let sink = Sink::new(out.clone(), CAPACITY).unwrap();
        (0..100).for_each(|i| sink.line(format!("{{\"n\":{i}}}").as_bytes()));
        assert!(sink.flush(Duration::from_secs(5)));
        let writes = out.0.lock().unwrap().clone();
        let text: String = writes.iter().map(|w| String::from_utf8_lossy(w).into_owned()).collect();
        assert_eq!(text.lines().count(), 100);
        assert!(text.lines().enumerate().all(|(i, l)| l == format!("{{\"n\":{i}}}")), "in order: {text}");
        assert!(writes.len() <= 2, "100 lines queued at once took {} writes", writes.len());
    }

    #[test]
    fn a_closed_output_counts_its_lines_as_dropped() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::new(Closed, CAPACITY).unwrap();
        (0..3).for_each(|_| sink.line(b"{}"));
        assert!(sink.flush(Duration::from_secs(5)));
        assert_eq!(sink.dropped().get(), 3);
    }
}
