//! What one node-view entry costs the agent, measured: the agent's own `NodeView` (the library
//! type the release agent uses) is filled in this process with a snapshot of realistic entries,
//! each then given credentials from moto, and the heap bytes this adds are counted by the
//! bench's counting allocator ([`Counting`]), divided by the entries.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kiam::agent::view::NodeView;
use kiam::creds::{AssumeRole, ImdsDocument};
use kiam::pb::node as pb;

use crate::deploy::{self, Env};
use crate::report::{Report, Row, Verdict};

/// Entries in the measured view (a busy node).
const ENTRIES: u32 = 500;

/// The system allocator, counting per thread the bytes requested minus the bytes freed, so that
/// a measurement on one thread is not disturbed by the bench's other tasks.
pub struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

/// Adds `bytes` to this thread's count (nothing while the thread is being torn down).
fn count(bytes: isize) {
    let _ = LIVE.try_with(|live| live.set(live.get() + bytes));
}

fn counted() -> isize {
    LIVE.with(Cell::get)
}

// SAFETY: every call is passed on to the system allocator unchanged; only a counter is added.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Measures the bytes per entry and adds the row to figure 6.
pub async fn run(env: &Env, report: &mut Report) {
    let credentials = deploy::sts(env)
        .assume_role(&deploy::identity("entry-role"), Duration::from_secs(3600))
        .await
        .expect("moto answers AssumeRole");
    let document = credentials.to_document();
    // On a thread of its own: the count is per thread, and nothing else runs there.
    let (per_entry, json) =
        std::thread::spawn(move || measure(&document)).join().expect("the measurement does not panic");
    report.row(Row::compared(
        6,
        &format!(
            "agent heap per node-view entry, with credentials ({ENTRIES} entries; baseline: the \
             JSON document it serves)"
        ),
        format!("{per_entry:.0} B"),
        format!("{json} B"),
        crate::stats::ratio(per_entry, json as f64),
        "",
        Verdict::Info,
    ));
    report.note(format!(
        "Figure 6, node-view entry: the agent's NodeView (the library type the release agent runs) \
         filled in the bench process with a snapshot of {ENTRIES} entries shaped like a \
         Deployment's pods (IP, UID, namespace, name, role, role ARN), then each given a moto \
         credentials document ({json} bytes as JSON), as the agent's fetcher stores it. Measured, \
         not computed: the bytes requested from the allocator in between (the bench's counting \
         allocator), divided by the entries: {per_entry:.0} B each, so a node of 110 pods holds \
         about {:.0} KiB of view. Allocator overhead per block is not included.",
        per_entry * 110.0 / 1024.0
    ));
}

/// Fills a view with [`ENTRIES`] entries holding `document`; the heap bytes per entry, and the
/// size of `document` as JSON.
fn measure(document: &ImdsDocument) -> (f64, usize) {
    let json = serde_json::to_vec(document).expect("the document encodes").len();
    let view = NodeView::new(Arc::new(kiam::metrics::Metrics::default()));
    // From before the snapshot is decoded (here: built), so that its strings, which the view
    // keeps, are counted; its own list is freed inside `replace` and so is not.
    let before = counted();
    let snapshot = pb::Snapshot {
        node: deploy::NODE.into(),
        entries: (0..ENTRIES)
            .map(|i| {
                let ip = deploy::nth_ip(std::net::Ipv4Addr::new(10, 1, 0, 0), i).to_string();
                pb::Entry {
                    ip,
                    uid: format!("6f1c2d3e-4b5a-4c6d-8e7f-{i:012}"),
                    namespace: "payments".into(),
                    name: format!("checkout-api-7d9f8c6b5d-{i:05}"),
                    role: "checkout-api".into(),
                    allowed: true,
                    denial: String::new(),
                    role_arn: format!("{}checkout-api", deploy::BASE_ARN),
                    terminating: false,
                    affinity: 0,
                    // Each its own identity, the most the view can cost: entries that share
                    // one share its credentials.
                    identity_high: u64::from(i) + 1,
                    identity_low: 1,
                }
            })
            .collect(),
    };
    view.replace(snapshot);
    let now = SystemTime::now();
    for (_, entry) in view.entries() {
        entry.store(document.clone(), now);
    }
    let after = counted();
    assert_eq!(view.health().entries, ENTRIES as usize);
    ((after - before).max(0) as f64 / f64::from(ENTRIES), json)
}
