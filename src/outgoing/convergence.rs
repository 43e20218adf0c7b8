//! The convergence decision of the source's migration thread, as pure
//! functions of what it measured: the link's rates (first-round pages and
//! re-sent ones apart), each window's figures, the expected downtime, and
//! whether to go on iterating or switch over. `outgoing` runs the loop.

use std::time::{Duration, Instant};

use super::WINDOW;

/// Share of the downtime limit the switchover plans to use.
pub const SWITCHOVER_MARGIN: f64 = 0.8;

/// Sending time one rate measurement takes (unthrottled).
pub(super) const RATE_SAMPLE: Duration = Duration::from_millis(20);

/// How long after the first round the loop may go on iterating, unthrottled,
/// to measure the rate of re-sent pages (the kind the last pass sends) when
/// it has none: the first round's rate predicts it badly (a first-round
/// page also pays for the destination's first touch of its memory), and
/// the pending set shrinks meanwhile.
const RESEND_PROBE: Duration = Duration::from_millis(40);

/// Windows per second: a speed limit's budget per window is its 1/10.
const WINDOWS_PER_SEC: u64 = 1000 / WINDOW.as_millis() as u64;

/// The convergence decision: keep iterating while the first round has not
/// reached every page (`fresh` bytes left: they must be sent anyway, and
/// sending them with the guest running costs no downtime), while the
/// pending bytes do not fit in what the downtime budget can send
/// (`max_size`, from the last window), while the estimate for the
/// pending mix as it is now (after the sync that `max_size` triggered)
/// exceeds the budget, or while `probing` for the rate of re-sent pages
/// (see `RESEND_PROBE`).
pub fn should_iterate(pending: u64, fresh: u64, max_size: u64, expected_ms: u64, budget_ms: f64, probing: bool) -> bool {
    pending > 0 && (fresh > 0 || probing || pending >= max_size || expected_ms as f64 > budget_ms)
}

/// Whether to go on iterating to measure the rate of re-sent pages (see
/// [`RESEND_PROBE`]): none measured yet, unthrottled (under a speed limit
/// the estimate takes the window's rate, whatever the pages), and less
/// than `RESEND_PROBE` before `now` since the first round reached every
/// page.
pub(super) fn probing(rates: &Rates, throttled: bool, first_round_done: Option<Instant>, now: Instant) -> bool {
    !rates.link_from_resend && !throttled && first_round_done.is_some_and(|t| now.saturating_duration_since(t) < RESEND_PROBE)
}

/// What one finished window tells about bandwidth and convergence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// The rates the last pass is expected to go at.
    pub rates: Rates,
    /// Dirty bytes (of the pending mix) that fit in the downtime limit.
    pub max_size: u64,
    /// Expected downtime of switching over at the end of the window.
    pub expected_downtime_ms: u64,
    /// Throughput of the window in megabits per second.
    pub mbps: f64,
}

/// One window's measurements.
#[derive(Debug, Clone, Copy, Default)]
pub struct WindowSample {
    /// Bytes written in the window, and its length.
    pub sent: u64,
    pub elapsed: Duration,
    /// The handlers' iterate calls that mostly re-sent pages the guest
    /// dirtied again, and the others (mostly first-round pages).
    pub resend: Bucket,
    pub first: Bucket,
    /// The window hit its byte budget (the speed limit was in force).
    pub throttled: bool,
}

/// What some iterate calls did: bytes written, dirty bytes retired (pages
/// × page size, however each went on the wire), the time they took
/// (dirty-log syncs and pacing sleeps are outside them), the part of it
/// spent in runs of zero pages (a scan each, next to nothing on the wire)
/// and the part the thread waited for a CPU (taken by other threads, e.g.
/// the guest's vCPUs, which give it back once the VM is stopped).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Bucket {
    pub wire: u64,
    pub retired: u64,
    pub time: Duration,
    pub zero_time: Duration,
    pub waited: Duration,
}

impl Bucket {
    pub(super) fn add(&mut self, wire: u64, retired: u64, time: Duration, zero_time: Duration, waited: Duration) {
        self.wire += wire;
        self.retired += retired;
        self.time += time;
        self.zero_time += zero_time.min(time);
        self.waited += waited.min(time);
    }

    /// Bytes per ms the link took while pages with data were sent, when
    /// there is enough to measure, leaving out the time the thread waited
    /// for a CPU (at most half of it: the estimate stays on the long side).
    fn link(&self) -> Option<f64> {
        let data = self.time.saturating_sub(self.zero_time);
        let data = data.saturating_sub(self.waited.min(data / 2));
        let ms = data.as_secs_f64() * 1000.0;
        (ms >= 1.0 && self.wire > 0).then(|| self.wire as f64 / ms)
    }

    /// Dirty bytes per ms retired, zero pages and all.
    fn retire_rate(&self) -> Option<f64> {
        let ms = self.time.as_secs_f64() * 1000.0;
        (ms >= 1.0 && self.retired > 0).then(|| self.retired as f64 / ms)
    }
}

/// Rates of the last pass, in bytes per millisecond, kept across windows.
///
/// Pending pages are of two kinds. Pages the guest dirtied again were
/// sent before and hold its writes: they go at the rate whole pages were
/// re-sent (`link`). Pages the first round has not reached yet may be
/// anything, and are often untouched zero pages that cost a scan, not a
/// page on the link: they go at the rate the first round has been
/// retiring pages (`first_round`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rates {
    pub link: f64,
    pub first_round: f64,
    /// `link` was measured on re-sent pages (not first-round ones, which
    /// also pay for the destination's first touch of its memory).
    pub link_from_resend: bool,
}

impl Rates {
    /// Takes in one window. Unthrottled, the rates are those of the
    /// iterate calls: the last pass, like them, writes as fast as the
    /// link takes, with no syncs between its writes. Under a speed limit
    /// they are the window's, as in QEMU: the link's real rate is unknown
    /// then, and the estimate errs long, never short.
    pub fn update(&mut self, w: &WindowSample) {
        let window_ms = w.elapsed.as_secs_f64() * 1000.0;
        if w.throttled {
            let r = w.sent as f64 / window_ms.max(1e-6);
            *self = Rates {
                link: r,
                first_round: r.max((w.resend.retired + w.first.retired) as f64 / window_ms.max(1e-6)),
                link_from_resend: false,
            };
            return;
        }
        if let Some(link) = w.resend.link() {
            (self.link, self.link_from_resend) = (link, true);
        }
        if let Some(r) = w.first.retire_rate() {
            self.first_round = r;
        }
        if !self.link_from_resend {
            if let Some(link) = w.first.link() {
                self.link = link;
            }
        }
        if self.link <= 0.0 && window_ms > 0.0 {
            self.link = w.sent as f64 / window_ms;
        }
        self.first_round = self.first_round.max(self.link);
    }

    /// What `link` was measured on, for the logs.
    pub(super) fn link_source(&self) -> &'static str {
        if self.link_from_resend {
            " (re-sent pages)"
        } else {
            " (first-round pages)"
        }
    }

    /// Milliseconds to send `pending` dirty bytes, `fresh` of them in
    /// pages the first round has not reached (None: nothing measured).
    pub fn time_ms(&self, pending: u64, fresh: u64) -> Option<f64> {
        if self.link <= 0.0 {
            return None;
        }
        let fresh = fresh.min(pending);
        Some((pending - fresh) as f64 / self.link + fresh as f64 / self.first_round.max(self.link))
    }
}

impl Window {
    /// Figures from the rates so far, one more window, the downtime limit, the dirty bytes
    /// pending (`fresh` of them not reached by the first round yet) and
    /// the time the last dirty-log sync took (the final one runs with the
    /// VM stopped).
    pub fn measure(mut rates: Rates, w: WindowSample, downtime_ns: u64, pending: u64, fresh: u64, sync: Duration) -> Window {
        rates.update(&w);
        // What is left of the budget once the final sync is paid for.
        let budget_ms = (budget_ms(downtime_ns) - sync.as_secs_f64() * 1000.0).max(0.0);
        // The bytes of the pending mix that fit in the budget.
        let max_size = match rates.time_ms(pending, fresh) {
            Some(t) if t > 0.0 => (pending as f64 * budget_ms / t) as u64,
            _ => (rates.link * budget_ms) as u64,
        };
        Window {
            rates,
            max_size,
            expected_downtime_ms: expected_downtime_ms(&rates, pending, fresh, sync),
            mbps: w.sent as f64 * 8.0 / w.elapsed.as_secs_f64().max(1e-9) / 1e6,
        }
    }
}

/// The byte budget of one window for a speed limit in bytes/s (0: none).
/// A limit below 10 bytes/s is a budget of one byte, not none; and as in
/// QEMU, a window whose budget is left sends at least one page, so limits
/// below a page per window (about 41 KB/s) still move a page per window.
pub(super) fn window_budget(speed: u64) -> u64 {
    if speed == 0 {
        0
    } else {
        (speed / WINDOWS_PER_SEC).max(1)
    }
}

/// The share of the downtime limit the switchover plans to use, in ms:
/// the last pass shares the link and the destination's CPU with device
/// state and the host's stop.
pub(super) fn budget_ms(downtime_ns: u64) -> f64 {
    downtime_ns as f64 / 1e6 * SWITCHOVER_MARGIN
}

/// The downtime of switching over now: the final sync, then the pending
/// bytes at `rates` (0 when nothing was measured yet).
pub fn expected_downtime_ms(rates: &Rates, pending: u64, fresh: u64, sync: Duration) -> u64 {
    match rates.time_ms(pending, fresh) {
        Some(t) => (sync.as_secs_f64() * 1000.0 + t).round() as u64,
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    #[test]
    fn window_budget_is_a_tenth_of_the_speed_and_never_unlimited_by_rounding() {
        assert_eq!(window_budget(0), 0, "no limit");
        assert_eq!(window_budget(128 << 20), (128 << 20) / 10);
        assert_eq!(window_budget(9), 1, "9 bytes/s is a limit, not none");
        assert_eq!(window_budget(1), 1);
        assert_eq!(window_budget(u64::MAX), u64::MAX / 10);
    }

    fn bucket(wire: u64, retired: u64, ms: u64) -> Bucket {
        Bucket { wire, retired, time: Duration::from_millis(ms), ..Default::default() }
    }

    fn first(sent: u64, b: Bucket, throttled: bool) -> WindowSample {
        WindowSample { sent, elapsed: Duration::from_millis(100), first: b, throttled, ..Default::default() }
    }

    #[test]
    fn window_figures() {
        // 10 MB in 100 ms = 100_000 bytes/ms, all of it while sending, all
        // pages whole; 300 ms of downtime sends 30 MB, of which the
        // switchover plans to use 80 %.
        let w = Window::measure(
            Rates::default(),
            first(10 * MB, bucket(10 * MB, 10 * MB, 100), false),
            300_000_000,
            15 * MB,
            0,
            Duration::ZERO,
        );
        assert_eq!((w.rates.link, w.rates.first_round), (100_000.0, 100_000.0));
        assert_eq!((w.max_size, w.expected_downtime_ms), (24 * MB, 150));
        assert!((w.mbps - 800.0).abs() < 1e-6);
        // Half the window went on syncs and the guest: the last pass goes
        // at the sending rate; a 10 ms sync comes off the budget and onto
        // the estimate.
        let w = Window::measure(
            Rates::default(),
            first(10 * MB, bucket(10 * MB, 10 * MB, 50), false),
            300_000_000,
            15 * MB,
            0,
            Duration::from_millis(10),
        );
        assert_eq!(w.rates.link, 200_000.0);
        assert_eq!((w.max_size, w.expected_downtime_ms), (46 * MB, 85));
        // Throttled: the window's rate, however fast the bursts were.
        let w =
            Window::measure(Rates::default(), first(10 * MB, bucket(10 * MB, 10 * MB, 5), true), 300_000_000, 15 * MB, 0, Duration::ZERO);
        assert_eq!((w.rates.link, w.expected_downtime_ms), (100_000.0, 150));
        // A sync longer than the budget: nothing fits.
        let w = Window::measure(
            Rates::default(),
            first(10 * MB, bucket(10 * MB, 10 * MB, 100), false),
            10_000_000,
            1,
            0,
            Duration::from_millis(9),
        );
        assert_eq!(w.max_size, 0);
        // Nothing sent: nothing fits, no estimate.
        let w = Window::measure(Rates::default(), first(0, Bucket::default(), false), 300_000_000, 1 << 20, 0, Duration::ZERO);
        assert_eq!((w.max_size, w.expected_downtime_ms), (0, 0));
        assert_eq!(expected_downtime_ms(&Rates::default(), 1 << 20, 0, Duration::from_millis(5)), 0);
    }

    #[test]
    fn first_round_and_resent_pages_have_their_own_rates() {
        // Whole pages at 100_000 bytes/ms set the link rate.
        let mut r = Rates::default();
        r.update(&first(10 * MB, bucket(10 * MB, 10 * MB, 100), false));
        // Then a window of mostly zero pages: 40 MB retired, 5 MB on the
        // wire, half of the 100 ms in runs of zero pages. The first round
        // goes at 400_000; the link, at 5 MB in 50 ms, still 100_000.
        let zeros = Bucket { zero_time: Duration::from_millis(50), ..bucket(5 * MB, 40 * MB, 100) };
        let w = Window::measure(r, first(5 * MB, zeros, false), 300_000_000, 20 * MB, 16 * MB, Duration::ZERO);
        assert_eq!((w.rates.link, w.rates.first_round), (100_000.0, 400_000.0));
        // 20 MB pending, 16 MB of them not reached yet: 4 MB / 100_000 +
        // 16 MB / 400_000 = 80 ms; the mix that fits in 240 ms is three
        // times the pending bytes.
        assert_eq!((w.expected_downtime_ms, w.max_size), (80, 60 * MB));
        // Re-dirtied pages only (the first round is over): the link's rate.
        assert_eq!(expected_downtime_ms(&w.rates, 20 * MB, 0, Duration::ZERO), 200);
        // Re-sending whole pages measures the link from then on; first-
        // round windows no longer change it.
        let mut r = w.rates;
        r.update(&WindowSample {
            sent: 25 * MB,
            elapsed: Duration::from_millis(100),
            resend: bucket(25 * MB, 25 * MB, 100),
            ..Default::default()
        });
        assert_eq!((r.link, r.link_from_resend), (250_000.0, true));
        r.update(&first(10 * MB, bucket(10 * MB, 10 * MB, 100), false));
        assert_eq!(r.link, 250_000.0);
        // A throttled window starts over from the window's rate.
        r.update(&first(10 * MB, bucket(10 * MB, 10 * MB, 5), true));
        assert_eq!((r.link, r.link_from_resend), (100_000.0, false));
    }

    #[test]
    fn time_waiting_for_a_cpu_is_left_out_of_the_link_rate() {
        // 10 MB in 100 ms, 20 of them waiting for a CPU the guest held: the
        // link takes 10 MB in 80 ms once the VM is stopped.
        let b = Bucket { waited: Duration::from_millis(20), ..bucket(10 * MB, 10 * MB, 100) };
        assert_eq!(b.link(), Some(125_000.0));
        // Zero-page runs come off first; at most half the rest is waiting.
        let b = Bucket { zero_time: Duration::from_millis(40), waited: Duration::from_millis(50), ..bucket(10 * MB, 10 * MB, 100) };
        assert_eq!(b.link(), Some((10 * MB) as f64 / 30.0));
        let mut r = Rates::default();
        r.update(&first(10 * MB, Bucket { waited: Duration::from_millis(20), ..bucket(10 * MB, 10 * MB, 100) }, false));
        assert_eq!(r.link, 125_000.0);
        // Throttled windows ignore it: the window's rate rules.
        r.update(&first(10 * MB, Bucket { waited: Duration::from_millis(20), ..bucket(10 * MB, 10 * MB, 5) }, true));
        assert_eq!(r.link, 100_000.0);
    }

    #[test]
    fn convergence_decision() {
        assert!(should_iterate(1, 0, 0, 0, 240.0, false), "before the first window everything iterates");
        assert!(should_iterate(30_000_000, 0, 30_000_000, 100, 240.0, false));
        assert!(!should_iterate(29_999_999, 0, 30_000_000, 240, 240.0, false), "fits in the downtime: switch over");
        assert!(should_iterate(29_999_999, 0, 30_000_000, 241, 240.0, false), "the mix after the sync costs more: go on");
        assert!(should_iterate(29_999_999, 4096, 30_000_000, 10, 240.0, false), "the first round is not over: go on");
        assert!(should_iterate(29_999_999, 0, 30_000_000, 10, 240.0, true), "fits, but re-sent pages are not measured yet: go on");
        assert!(!should_iterate(0, 0, 0, 0, 0.0, false), "nothing pending: switch over");
        assert!(!should_iterate(0, 0, 0, 0, 240.0, true), "nothing pending, even while probing: switch over");
    }

    #[test]
    fn probing_for_the_rate_of_resent_pages() {
        let done = Instant::now();
        let (soon, late) = (done + RESEND_PROBE - Duration::from_millis(1), done + RESEND_PROBE);
        let first = Rates { link: 1000.0, first_round: 1000.0, link_from_resend: false };
        let resent = Rates { link_from_resend: true, ..first };
        assert!(!probing(&first, false, None, done), "the first round is not over");
        assert!(probing(&first, false, Some(done), done), "just over, only first-round pages measured");
        assert!(probing(&first, false, Some(done), soon), "still within the probe's time");
        assert!(!probing(&first, false, Some(done), late), "the probe's time is up");
        assert!(!probing(&resent, false, Some(done), done), "re-sent pages measured");
        assert!(!probing(&first, true, Some(done), done), "throttled");
    }
}
