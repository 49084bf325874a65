//! The process's two output streams, each queued in memory and written by a thread of its own:
//! the audit log on stdout (one JSON line per tunnel, per WebSocket session and per issued
//! ticket) and the tracing log on stderr.
//!
//! Written in place, a reader that stalls (a container runtime's log pipe, a `| less`) would
//! block the writing thread in write(2) once the pipe's 64 KiB were full: a proxy worker, and
//! with it every tunnel on that worker, or an engine API request. So each queue is bounded, and
//! a line that finds it full is dropped and counted (`*_audit_lines_dropped_total`,
//! `*_log_lines_dropped_total`); once the stream takes lines again, a line saying how many were
//! lost is written where they would have been. Lines that arrive within `BATCH_DELAY` of the
//! first share one write(2), so a busy proxy writes a few times per second instead of once per
//! tunnel. (tracing-appender's non-blocking writer queues too, but wakes its thread and writes
//! once per line.)

use std::io::Write;
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

/// How many bytes of lines may wait for a stream: about 5,000 tunnel lines.
pub const CAPACITY: usize = 1 << 20;
/// How long the writer waits after the first line of a batch for more to join it.
const BATCH_DELAY: Duration = Duration::from_millis(5);

/// Makes the line, newline included, that says how many lines were lost.
pub type Notice = fn(dropped: u64) -> String;

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
    pub fn new(out: impl Write + Send + 'static, capacity: usize, notice: Notice) -> std::io::Result<Sink> {
        Sink::counting_into(out, capacity, notice, Counter::default())
    }

    fn counting_into(out: impl Write + Send + 'static, capacity: usize, notice: Notice, dropped: Counter) -> std::io::Result<Sink> {
        let shared = Arc::new(Shared { state: Mutex::default(), arrived: Condvar::new(), drained: Condvar::new(), capacity, dropped });
        let writer = shared.clone();
        std::thread::Builder::new().name("log-writer".into()).spawn(move || write_batches(&writer, out, notice))?;
        Ok(Sink { shared })
    }

    /// Queues `line` and a newline and returns at once: dropped and counted when the queue is
    /// full.
    pub fn line(&self, line: &[u8]) {
        self.queue(&[line, b"\n"]);
    }

    /// Queues `text`, which ends with its own newline (a formatted tracing event), as `line` does.
    pub fn text(&self, text: &[u8]) {
        self.queue(&[text]);
    }

    fn queue(&self, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut state = self.shared.lock();
        if state.queue.len() + len > self.shared.capacity {
            drop(state);
            self.shared.dropped.inc();
            return;
        }
        parts.iter().for_each(|p| state.queue.extend_from_slice(p));
        let wake = std::mem::take(&mut state.waiting);
        drop(state);
        if wake {
            self.shared.arrived.notify_one();
        }
    }

    /// Waits until every line queued so far was written, for at most `within`; false if they
    /// were not (the stream still blocked).
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

fn write_batches(shared: &Shared, mut out: impl Write, notice: Notice) {
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
            batch.extend_from_slice(notice(dropped - reported).as_bytes());
            reported = dropped;
        }
        if out.write_all(&batch).and_then(|()| out.flush()).is_err() {
            // The stream is gone (a closed pipe): nobody will read these either.
            shared.dropped.inc_by(lines);
            reported += lines;
        }
    }
}

static STDOUT: OnceLock<Sink> = OnceLock::new();

/// The process's audit log on stdout, its thread started on first use.
pub fn stdout() -> &'static Sink {
    STDOUT.get_or_init(|| Sink::new(std::io::stdout(), CAPACITY, audit_notice).expect("cannot start the audit log's thread"))
}

fn audit_notice(dropped: u64) -> String {
    format!("{{\"event\":\"auditLinesDropped\",\"count\":{dropped},\"reason\":\"stdout did not take the lines as fast as they came\"}}\n")
}

static STDERR: OnceLock<Sink> = OnceLock::new();
/// Counted apart from the sink, so that /metrics shows the series (at 0) in a process whose
/// tracing log is not queued: the in-process servers of tests.
static STDERR_DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Log lines dropped because stderr did not take them (a shared handle, for a metrics registry).
pub fn stderr_dropped() -> Counter {
    STDERR_DROPPED.clone()
}

/// A tracing writer that queues each formatted event for stderr, for
/// `tracing_subscriber::fmt().with_writer(..)`: the first call starts the queue, whose notice of
/// lost lines is a JSON event when `json`, else a text one, as the log's other lines are.
pub fn stderr_writer(json: bool) -> impl Fn() -> QueuedStderr + Send + Sync + 'static {
    let notice: Notice = if json { json_log_notice } else { text_log_notice };
    let sink = STDERR.get_or_init(|| Sink::counting_into(std::io::stderr(), CAPACITY, notice, stderr_dropped()).expect("cannot start the log's thread"));
    move || QueuedStderr(sink)
}

/// One formatted event on its way to the stderr queue.
pub struct QueuedStderr(&'static Sink);

impl Write for QueuedStderr {
    /// tracing-subscriber writes each event with one `write_all`: taking it whole keeps it whole.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.text(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const STDERR_NOTICE: &str = "log lines dropped: stderr did not take them as fast as they came";

fn text_log_notice(dropped: u64) -> String {
    format!("{}  WARN {}: {STDERR_NOTICE} count={dropped}\n", k8s_openapi::jiff::Timestamp::now(), module_path!())
}

fn json_log_notice(dropped: u64) -> String {
    let event = serde_json::json!({
        "timestamp": k8s_openapi::jiff::Timestamp::now().to_string(),
        "level": "WARN",
        "fields": { "message": STDERR_NOTICE, "count": dropped },
        "target": module_path!(),
    });
    format!("{event}\n")
}

/// Before the process exits (or a panic's message is printed): writes what is queued on both
/// streams, waiting at most `within` for each.
pub fn flush_all(within: Duration) {
    for sink in [STDOUT.get(), STDERR.get()].into_iter().flatten() {
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
        let sink = Arc::new(Sink::new(out.clone(), 100, audit_notice).unwrap());
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
        let sink = Sink::new(out.clone(), CAPACITY, audit_notice).unwrap();
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
        let sink = Sink::new(Closed, CAPACITY, audit_notice).unwrap();
        (0..3).for_each(|_| sink.line(b"{}"));
        assert!(sink.flush(Duration::from_secs(5)));
        assert_eq!(sink.dropped().get(), 3);
    }

    /// The stderr queue takes tracing's formatted events as they are and says what it lost in
    /// the log's own format.
    #[test]
    fn log_events_keep_their_own_newline_and_the_notice_matches_the_log_format() {
        let out = Stalled::default();
        let sink = Sink::new(out.clone(), 60, json_log_notice).unwrap();
        sink.text(b"2026-12-05T11:00:00Z  WARN x: first\n");
        std::thread::sleep(BATCH_DELAY * 4);
        // 34 bytes each in a queue of 60: one fits, two are lost.
        (0..3).for_each(|i| sink.text(format!("2026-12-05T11:00:0{i}Z  WARN x: next\n").as_bytes()));
        out.open();
        assert!(sink.flush(Duration::from_secs(5)));
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..2], ["2026-12-05T11:00:00Z  WARN x: first", "2026-12-05T11:00:00Z  WARN x: next"], "{text}");
        let notice: serde_json::Value = serde_json::from_str(lines[2]).expect("the notice is a JSON event");
        assert_eq!((notice["level"].as_str(), notice["fields"]["count"].as_u64()), (Some("WARN"), Some(2)), "{notice}");
        assert!(notice["timestamp"].as_str().unwrap().parse::<k8s_openapi::jiff::Timestamp>().is_ok(), "{notice}");
        assert_eq!(lines.len(), 3, "{text}");
        let plain = text_log_notice(7);
        assert!(plain.ends_with(&format!(" WARN spice_operator::log_queue: {STDERR_NOTICE} count=7\n")), "{plain}");
        assert!(plain.split(' ').next().unwrap().parse::<k8s_openapi::jiff::Timestamp>().is_ok(), "{plain}");
    }
}
