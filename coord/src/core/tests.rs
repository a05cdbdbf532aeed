//! Core tests: feed events, assert the exact commands. Each test names the DESIGN.md rule it
//! covers. Times are in ms; configs use heartbeat 50 ms and failure timeout 300 ms.

use super::*;

const HEARTBEAT_MS: u64 = 50;
const FAILURE_MS: u64 = 300;

fn config(n: u32, wait_for: WaitFor) -> CoreConfig {
    CoreConfig {
        servers: (1..=n).map(NodeId).collect(),
        heartbeat_interval_ms: HEARTBEAT_MS,
        failure_timeout_ms: FAILURE_MS,
        wait_for,
    }
}

fn report(id: u32, term: u64, role: Role, last_log: (u64, u64)) -> ServerReport {
    ServerReport {
        id: NodeId(id),
        uuid: format!("uuid-{id}"),
        term: Term(term),
        role,
        leader: NodeId::NONE,
        last_log: LogPosition {
            term: Term(last_log.0),
            index: LogIndex(last_log.1),
        },
        commit_index: LogIndex(0),
        new_storage: false,
        caught_up: Vec::new(),
    }
}

fn joined(id: u32, term: u64, role: Role, now_ms: u64) -> Event {
    Event::Joined {
        id: NodeId(id),
        report: report(id, term, role, (0, 0)),
        now_ms,
    }
}

fn heartbeat_ok(id: u32, term: u64, role: Role, now_ms: u64) -> Event {
    Event::HeartbeatOk {
        id: NodeId(id),
        report: report(id, term, role, (0, 0)),
        now_ms,
    }
}

fn prepare_ok(id: u32, term: u64, last_log: (u64, u64)) -> Event {
    Event::PrepareOk {
        id: NodeId(id),
        term: Term(term),
        last_log_term: Term(last_log.0),
        last_log_index: LogIndex(last_log.1),
        uuid: format!("uuid-{id}"),
    }
}

/// Steps the core and drops `PersistMembers` (the storage-record tests check it explicitly),
/// so the other tests keep asserting the exact heartbeats, prepares and terms.
fn step(core: &mut CoordCore, event: Event) -> Vec<Command> {
    let mut out = core.step(event);
    out.retain(|c| !matches!(c, Command::PersistMembers(_)));
    out
}

fn tick(now_ms: u64) -> Event {
    Event::Tick { now_ms }
}

fn view(term: u64, leader: u32) -> LeaderView {
    LeaderView {
        term: Term(term),
        leader: NodeId(leader),
        leader_uuid: if leader == 0 {
            String::new()
        } else {
            format!("uuid-{leader}")
        },
    }
}

fn prepares(term: u64, ids: &[u32]) -> Vec<Command> {
    ids.iter()
        .map(|&id| Command::SendPrepare {
            to: NodeId(id),
            term: Term(term),
        })
        .collect()
}

fn heartbeats(term: u64, leader: u32, n: u32) -> Vec<Command> {
    (1..=n)
        .map(|id| Command::SendHeartbeat {
            catching_up: Vec::new(),
            to: NodeId(id),
            term: Term(term),
            leader_id: NodeId(leader),
        })
        .collect()
}

/// The commands of a new epoch: persist, publish "no leader", Prepare to everyone.
fn epoch_start(term: u64, n: u32) -> Vec<Command> {
    let ids: Vec<u32> = (1..=n).collect();
    let mut out = vec![
        Command::PersistTerm(Term(term)),
        Command::PublishLeader(view(term, 0)),
    ];
    out.extend(prepares(term, &ids));
    out
}

/// The commands of a designation: publish, then heartbeat everyone at once.
fn designation(term: u64, leader: u32, n: u32) -> Vec<Command> {
    let mut out = vec![Command::PublishLeader(view(term, leader))];
    out.extend(heartbeats(term, leader, n));
    out
}

fn concat(parts: &[Vec<Command>]) -> Vec<Command> {
    parts.concat()
}

/// A new cluster of `n` servers, all joined at t=0 and prepared for term 1 with equal logs, so
/// server 1 leads term 1. The next heartbeat is due at t=50.
fn stable_cluster(n: u32) -> CoordCore {
    let mut core = CoordCore::new(config(n, WaitFor::All), Term(0), 0);
    for id in 1..=n {
        step(&mut core, joined(id, 0, Role::Follower, 0));
    }
    for id in 1..=n {
        step(&mut core, prepare_ok(id, 1, (0, 0)));
    }
    assert_eq!(core.view(), &view(1, 1));
    core
}

/// DESIGN rule 1: the term is persisted before any Prepare (or anything else) carries it, and
/// DESIGN section 4 / rule 2: a new cluster waits for every server (`wait_for = all`) first.
#[test]
fn term_is_persisted_before_any_prepare_for_it() {
    let mut core = CoordCore::new(config(3, WaitFor::All), Term(0), 0);
    assert_eq!(
        step(&mut core, tick(0)),
        heartbeats(0, 0, 3),
        "heartbeats start at once"
    );
    assert_eq!(step(&mut core, joined(1, 0, Role::Follower, 1)), vec![]);
    assert_eq!(
        step(&mut core, heartbeat_ok(2, 0, Role::Follower, 2)),
        vec![]
    );
    let out = step(&mut core, joined(3, 0, Role::Follower, 3));
    assert_eq!(out, epoch_start(1, 3));
    assert_eq!(out[0], Command::PersistTerm(Term(1)), "persist comes first");
    assert_eq!(core.epoch_term(), Some(Term(1)));
}

/// DESIGN section 4 / rule 2: `wait_for = majority` starts the first epoch once a majority of
/// the configured servers has joined.
#[test]
fn wait_for_majority_starts_with_a_majority() {
    let mut core = CoordCore::new(config(5, WaitFor::Majority), Term(0), 0);
    assert_eq!(step(&mut core, joined(1, 0, Role::Follower, 0)), vec![]);
    assert_eq!(step(&mut core, joined(4, 0, Role::Follower, 0)), vec![]);
    assert_eq!(
        step(&mut core, joined(5, 0, Role::Follower, 0)),
        epoch_start(1, 5)
    );
}

/// DESIGN rule 2: Prepare goes again, each heartbeat interval, to servers that have not
/// answered it; during the epoch change heartbeats carry no leader.
#[test]
fn prepare_is_resent_to_servers_that_have_not_answered() {
    let mut core = CoordCore::new(config(3, WaitFor::All), Term(0), 0);
    for id in 1..=3 {
        step(&mut core, joined(id, 0, Role::Follower, 0));
    }
    assert_eq!(step(&mut core, prepare_ok(1, 1, (0, 0))), vec![]);
    assert_eq!(
        step(&mut core, tick(49)),
        heartbeats(1, 0, 3),
        "not yet time to resend"
    );
    assert_eq!(
        step(&mut core, tick(50)),
        concat(&[prepares(1, &[2, 3]), heartbeats(1, 0, 3)])
    );
}

/// DESIGN rule 2: no leader without ok answers from a majority of ALL configured servers, even
/// when every live server answered (5 servers, 2 alive); the epoch completes when a third
/// server comes back and prepares.
#[test]
fn no_leader_with_fewer_than_a_majority_of_all_servers() {
    let mut core = stable_cluster(5);
    // Servers 2 and 3 keep answering; 1 (the leader), 4 and 5 go silent after t=0.
    let mut t = 0;
    while t < 250 {
        t += HEARTBEAT_MS;
        assert_eq!(step(&mut core, tick(t)), heartbeats(1, 1, 5));
        step(&mut core, heartbeat_ok(2, 1, Role::Follower, t));
        step(&mut core, heartbeat_ok(3, 1, Role::Follower, t));
    }
    assert_eq!(
        step(&mut core, tick(300)),
        concat(&[epoch_start(2, 5), heartbeats(2, 0, 5)]),
        "leader 1 failed at t=300"
    );
    assert!(!core.is_alive(NodeId(4)) && !core.is_alive(NodeId(5)));
    assert_eq!(step(&mut core, prepare_ok(2, 2, (1, 7))), vec![]);
    assert_eq!(
        step(&mut core, prepare_ok(3, 2, (1, 7))),
        vec![],
        "every live server prepared, but 2 < majority 3 of 5"
    );
    assert_eq!(core.view(), &view(2, 0));
    // Server 4 prepared while it was still failed: its answer waits until it is alive again.
    assert_eq!(step(&mut core, prepare_ok(4, 2, (1, 9))), vec![]);
    assert_eq!(
        step(&mut core, heartbeat_ok(4, 2, Role::Follower, 310)),
        designation(2, 4, 5),
        "server 4 alive again: 3 of 5 prepared; it has the longest log"
    );
}

/// DESIGN rule 2: the leader is the responder with the greatest (last_log_term,
/// last_log_index): a shorter log of a newer term beats a longer log of an older term.
#[test]
fn picks_the_most_up_to_date_responder_by_term_then_index() {
    let mut core = CoordCore::new(config(5, WaitFor::All), Term(0), 0);
    for id in 1..=5 {
        step(&mut core, joined(id, 0, Role::Follower, 0));
    }
    assert_eq!(step(&mut core, prepare_ok(1, 1, (1, 10))), vec![]);
    assert_eq!(step(&mut core, prepare_ok(3, 1, (2, 4))), vec![]);
    assert_eq!(
        step(&mut core, prepare_ok(5, 1, (2, 5))),
        designation(1, 5, 5)
    );
}

/// DESIGN rule 2: among equally up-to-date responders the lowest id leads (deterministic).
#[test]
fn equal_logs_elect_the_lowest_responding_id() {
    let mut core = CoordCore::new(config(3, WaitFor::All), Term(0), 0);
    for id in 1..=3 {
        step(&mut core, joined(id, 0, Role::Follower, 0));
    }
    assert_eq!(step(&mut core, prepare_ok(3, 1, (0, 0))), vec![]);
    assert_eq!(
        step(&mut core, prepare_ok(2, 1, (0, 0))),
        designation(1, 2, 3)
    );
}

/// DESIGN rules 1-2: answers to an older term's Prepare (ok or refused) are ignored; only
/// answers for the current epoch's term count.
#[test]
fn answers_for_an_older_term_are_ignored() {
    let mut core = stable_cluster(3);
    for t in [50, 100, 150, 200, 250] {
        step(&mut core, tick(t));
        step(&mut core, heartbeat_ok(2, 1, Role::Follower, t));
        step(&mut core, heartbeat_ok(3, 1, Role::Follower, t));
    }
    assert_eq!(
        step(&mut core, tick(300)),
        concat(&[epoch_start(2, 3), heartbeats(2, 0, 3)])
    );
    assert_eq!(step(&mut core, prepare_ok(2, 1, (1, 3))), vec![]);
    assert_eq!(step(&mut core, prepare_ok(3, 1, (1, 3))), vec![]);
    assert_eq!(
        step(
            &mut core,
            Event::PrepareRejected {
                id: NodeId(3),
                term: Term(1)
            }
        ),
        vec![]
    );
    assert_eq!(core.view(), &view(2, 0), "stale answers designate nobody");
    assert_eq!(step(&mut core, prepare_ok(2, 2, (1, 3))), vec![]);
    assert_eq!(
        step(&mut core, prepare_ok(3, 2, (1, 4))),
        designation(2, 3, 3)
    );
}

/// DESIGN rule 1: a Prepare refused with a higher term restarts the epoch change above that
/// term (persisted first), so the coord never issues a term a server already holds.
#[test]
fn refusal_with_a_higher_term_restarts_above_it() {
    let mut core = CoordCore::new(config(3, WaitFor::All), Term(0), 0);
    for id in 1..=3 {
        step(&mut core, joined(id, 0, Role::Follower, 0));
    }
    assert_eq!(core.epoch_term(), Some(Term(1)));
    let out = step(
        &mut core,
        Event::PrepareRejected {
            id: NodeId(2),
            term: Term(5),
        },
    );
    assert_eq!(out, epoch_start(6, 3));
    assert_eq!(core.highest_term(), Term(6));
    assert_eq!(
        step(&mut core, prepare_ok(1, 1, (0, 0))),
        vec![],
        "term 1 is over"
    );
}

/// DESIGN section 4: a failed leader triggers an epoch change at once, with a higher term.
#[test]
fn leader_failure_starts_an_epoch_change_with_a_higher_term() {
    let mut core = stable_cluster(3);
    for t in [50, 100, 150, 200, 250] {
        assert_eq!(step(&mut core, tick(t)), heartbeats(1, 1, 3));
        step(&mut core, heartbeat_ok(2, 1, Role::Follower, t));
        step(&mut core, heartbeat_ok(3, 1, Role::Follower, t));
    }
    assert!(
        core.is_alive(NodeId(1)),
        "299 ms of silence is not yet a failure"
    );
    assert_eq!(
        step(&mut core, tick(300)),
        concat(&[epoch_start(2, 3), heartbeats(2, 0, 3)])
    );
    assert!(!core.is_alive(NodeId(1)));
    assert!(core.highest_term() > Term(1));
}

/// DESIGN section 4: a server fails after `failure_timeout_ms` without a successful answer
/// (measured by Tick's now_ms, misses alone decide nothing) and is alive again on the next one.
#[test]
fn failure_detection_follows_tick_time() {
    let mut core = stable_cluster(3);
    step(&mut core, heartbeat_ok(1, 1, Role::Leader, 100));
    step(&mut core, heartbeat_ok(3, 1, Role::Follower, 100));
    step(&mut core, heartbeat_ok(2, 1, Role::Follower, 100));
    for _ in 0..10 {
        step(&mut core, Event::HeartbeatFailed { id: NodeId(2) });
    }
    step(&mut core, heartbeat_ok(1, 1, Role::Leader, 350));
    step(&mut core, heartbeat_ok(3, 1, Role::Follower, 350));
    step(&mut core, tick(399));
    assert!(core.is_alive(NodeId(2)), "silent for 299 ms");
    step(&mut core, tick(400));
    assert!(!core.is_alive(NodeId(2)), "silent for 300 ms");
    assert_eq!(
        core.view(),
        &view(1, 1),
        "a follower failing changes no term"
    );
    step(&mut core, heartbeat_ok(2, 1, Role::Follower, 420));
    assert!(core.is_alive(NodeId(2)), "alive again on its next answer");
}

/// DESIGN section 4: a designated leader that keeps reporting it does not lead the current
/// term (it restarted and lost the designation) is replaced after the failure timeout.
#[test]
fn leader_that_keeps_denying_leadership_is_replaced() {
    let mut core = stable_cluster(3);
    // Confirming leadership clears the clock.
    step(&mut core, heartbeat_ok(1, 1, Role::Follower, 10));
    step(&mut core, heartbeat_ok(1, 1, Role::Leader, 20));
    let mut t = 0;
    while t < 350 {
        t += HEARTBEAT_MS;
        assert_eq!(step(&mut core, tick(t)), heartbeats(1, 1, 3), "t={t}");
        for id in 1..=3 {
            step(&mut core, heartbeat_ok(id, 1, Role::Follower, t));
        }
    }
    // Denying since t=50; at t=350 that is exactly 300 ms, not longer.
    assert_eq!(
        step(&mut core, tick(400)),
        concat(&[epoch_start(2, 3), heartbeats(2, 0, 3)])
    );
}

/// A 3-server cluster whose leader 1 keeps reporting "follower" until the coord starts term 2;
/// returns the core and the time reached.
fn leader_1_replaced_for_not_leading() -> (CoordCore, u64) {
    let mut core = stable_cluster(3);
    let mut t = 0;
    while t < 400 {
        t += HEARTBEAT_MS;
        step(&mut core, tick(t));
        for id in 1..=3 {
            step(&mut core, heartbeat_ok(id, 1, Role::Follower, t));
        }
    }
    (core, t)
}

/// Liveness: a leader replaced for not leading (cut from its peers, not from the coord) has the
/// longest log, with the writes it could not commit. It is passed over while a quorum without
/// it can form, and chosen from any majority only after a failure timeout (DESIGN rule 2 holds
/// either way: the choice is the best of a majority of prepared servers).
#[test]
fn replaced_leader_is_passed_over_while_others_form_a_quorum() {
    let (mut core, _) = leader_1_replaced_for_not_leading();
    assert_eq!(core.epoch_term(), Some(Term(2)), "leader 1 replaced");
    // The old leader answers first, with the longest log; server 2 next.
    assert_eq!(step(&mut core, prepare_ok(1, 2, (1, 9))), vec![]);
    assert_eq!(
        step(&mut core, prepare_ok(2, 2, (1, 5))),
        vec![],
        "no quorum without server 1 yet"
    );
    assert_eq!(
        step(&mut core, prepare_ok(3, 2, (1, 5))),
        designation(2, 2, 3)
    );
}

/// ...and when the others cannot form a quorum without it, it is chosen after a failure timeout.
#[test]
fn replaced_leader_is_chosen_when_no_other_quorum_forms() {
    let (mut core, mut t) = leader_1_replaced_for_not_leading();
    assert_eq!(core.epoch_term(), Some(Term(2)));
    step(&mut core, prepare_ok(1, 2, (1, 9)));
    step(&mut core, prepare_ok(2, 2, (1, 5)));
    let mut designated = false;
    while t < 1_000 && !designated {
        t += HEARTBEAT_MS;
        let cmds = step(&mut core, tick(t));
        for id in [1, 2] {
            step(&mut core, heartbeat_ok(id, 2, Role::Follower, t));
        }
        designated = cmds
            .iter()
            .any(|c| matches!(c, Command::PublishLeader(v) if v.leader == NodeId(1)));
    }
    assert!(designated && t >= 400 + 300, "designated at {t}");
}

/// DESIGN section 4 (coord restart) and rule 1: a running leader of the persisted term is
/// adopted without a new term.
#[test]
fn restart_adopts_a_leader_of_the_persisted_term() {
    let mut core = CoordCore::new(config(3, WaitFor::All), Term(4), 0);
    assert_eq!(step(&mut core, tick(0)), heartbeats(4, 0, 3));
    assert_eq!(
        step(&mut core, heartbeat_ok(2, 4, Role::Follower, 5)),
        vec![]
    );
    assert_eq!(
        step(&mut core, heartbeat_ok(1, 4, Role::Leader, 6)),
        designation(4, 1, 3),
        "no PersistTerm, no Prepare: the term stays 4"
    );
    assert_eq!(core.highest_term(), Term(4));
}

/// DESIGN section 4 (coord restart) and rule 1: a reported leader of a term below the
/// persisted one is stale (the coord had started a newer epoch), so after one failure timeout
/// of hearing from a majority the coord starts a new, higher term.
#[test]
fn restart_starts_a_new_term_when_the_reported_leader_is_older() {
    let mut core = CoordCore::new(config(3, WaitFor::All), Term(4), 0);
    assert_eq!(step(&mut core, tick(0)), heartbeats(4, 0, 3));
    assert_eq!(
        step(&mut core, heartbeat_ok(1, 3, Role::Leader, 10)),
        vec![]
    );
    assert_eq!(
        step(&mut core, heartbeat_ok(2, 3, Role::Follower, 10)),
        vec![],
        "a majority joined at t=10: look for a leader of term 4 until t=310"
    );
    for t in [100, 200, 300] {
        assert_eq!(step(&mut core, tick(t)), heartbeats(4, 0, 3), "t={t}");
        step(&mut core, heartbeat_ok(1, 3, Role::Leader, t));
        step(&mut core, heartbeat_ok(2, 3, Role::Follower, t));
    }
    assert_eq!(step(&mut core, tick(310)), epoch_start(5, 3));
}

/// DESIGN rule 1: a server reporting a term above the persisted one (the term file was lost)
/// raises the highest term, persisted, before anything uses it; a leader of that term is
/// then adopted.
#[test]
fn report_above_the_persisted_term_raises_it_first() {
    let mut core = CoordCore::new(config(3, WaitFor::All), Term(4), 0);
    let out = step(&mut core, heartbeat_ok(1, 6, Role::Leader, 5));
    assert_eq!(
        out,
        concat(&[
            vec![
                Command::PersistTerm(Term(6)),
                Command::PublishLeader(view(6, 0))
            ],
            designation(6, 1, 3),
        ])
    );
    // Later, in a stable view, an even higher term forces an epoch change above it.
    assert_eq!(
        step(&mut core, heartbeat_ok(2, 9, Role::Follower, 10)),
        epoch_start(10, 3)
    );
}

/// DESIGN section 4: reports from an unknown server, or with an id that does not match the
/// address heartbeated, change nothing.
#[test]
fn mismatched_or_unknown_ids_are_ignored() {
    let mut core = CoordCore::new(config(3, WaitFor::Majority), Term(0), 0);
    let wrong = Event::HeartbeatOk {
        id: NodeId(1),
        report: report(2, 0, Role::Follower, (0, 0)),
        now_ms: 0,
    };
    assert_eq!(step(&mut core, wrong), vec![]);
    assert_eq!(step(&mut core, joined(7, 0, Role::Follower, 0)), vec![]);
    assert!(!core.is_alive(NodeId(1)) && !core.is_alive(NodeId(2)));
}

fn members_persisted(out: &[Command]) -> Option<Members> {
    out.iter().rev().find_map(|c| match c {
        Command::PersistMembers(m) => Some(m.clone()),
        _ => None,
    })
}

fn with_uuid(event: Event, uuid: &str) -> Event {
    match event {
        Event::HeartbeatOk {
            id,
            mut report,
            now_ms,
        } => {
            report.uuid = uuid.to_string();
            Event::HeartbeatOk { id, report, now_ms }
        }
        Event::PrepareOk {
            id,
            term,
            last_log_term,
            last_log_index,
            ..
        } => Event::PrepareOk {
            id,
            term,
            last_log_term,
            last_log_index,
            uuid: uuid.to_string(),
        },
        other => other,
    }
}

/// DESIGN rule 10: joining servers are recorded (durably, before anything else) as voters with
/// their storage identity; the record survives a coord restart.
#[test]
fn storage_identities_are_recorded_when_servers_join() {
    let mut core = CoordCore::new(config(3, WaitFor::All), Term(0), 0);
    let out = core.step(joined(1, 0, Role::Follower, 0));
    let members = members_persisted(&out).expect("recorded at once");
    assert_eq!(
        members.get(&NodeId(1)),
        Some(&Member {
            uuid: "uuid-1".into(),
            voter: true
        })
    );
    assert_eq!(
        members_persisted(&core.step(joined(1, 0, Role::Follower, 5))),
        None
    );
    core.step(joined(2, 0, Role::Follower, 5));
    core.step(joined(3, 0, Role::Follower, 5));
    let restarted =
        CoordCore::recovered(config(3, WaitFor::All), Term(1), core.members().clone(), 0);
    assert_eq!(restarted.members().len(), 3);
    assert!(restarted.members().values().all(|m| m.voter));
}

/// DESIGN rule 10, the scenario that lost an acknowledged write: 3 servers, the leader's
/// follower comes back with a wiped directory (a new storage identity). It is a catching-up
/// member: heartbeats tell the leader so, its Prepare answers do not count, so with the leader
/// gone the remaining voter alone cannot elect anyone. When a leader reports it caught up, it
/// is a voter again.
#[test]
fn a_server_back_with_new_storage_does_not_vote_until_caught_up() {
    let mut core = stable_cluster(3);
    let out = core.step(with_uuid(
        heartbeat_ok(3, 0, Role::Follower, 10),
        "uuid-3-wiped",
    ));
    let members = members_persisted(&out).expect("the new identity is recorded at once");
    assert_eq!(
        members[&NodeId(3)],
        Member {
            uuid: "uuid-3-wiped".into(),
            voter: false
        }
    );
    let listed = vec![(NodeId(3), "uuid-3-wiped".to_string())];
    let out = step(&mut core, tick(50));
    assert!(
        out.iter().all(|c| matches!(c,
        Command::SendHeartbeat { catching_up, .. } if *catching_up == listed)),
        "{out:?}"
    );
    // The leader fails; 2 and 3 stay alive.
    for t in [100, 150, 200, 250, 300, 350] {
        step(&mut core, heartbeat_ok(2, 1, Role::Follower, t));
        step(
            &mut core,
            with_uuid(heartbeat_ok(3, 1, Role::Follower, t), "uuid-3-wiped"),
        );
        step(&mut core, tick(t));
    }
    let term = core
        .epoch_term()
        .expect("an epoch change for the failed leader");
    assert_eq!(step(&mut core, prepare_ok(2, term.0, (1, 5))), vec![]);
    let wiped = with_uuid(prepare_ok(3, term.0, (0, 0)), "uuid-3-wiped");
    assert_eq!(
        step(&mut core, wiped),
        vec![],
        "a catching-up server does not vote"
    );
    let stale = prepare_ok(3, term.0, (1, 5)); // an answer under the old identity
    assert_eq!(step(&mut core, stale), vec![], "nor does its old identity");
    for t in [400, 450, 500, 550, 600, 650, 700] {
        step(&mut core, heartbeat_ok(2, term.0, Role::Follower, t));
        step(
            &mut core,
            with_uuid(heartbeat_ok(3, term.0, Role::Follower, t), "uuid-3-wiped"),
        );
        step(&mut core, tick(t));
        assert_eq!(
            core.view().leader,
            NodeId::NONE,
            "unavailable, never rolled back"
        );
    }
    // Server 1 returns with its data: 1 and 2 are a voter majority.
    step(&mut core, heartbeat_ok(1, 1, Role::Follower, 700));
    let out = step(&mut core, prepare_ok(1, term.0, (1, 7)));
    assert_eq!(
        out,
        designation(term.0, 1, 3)
            .into_iter()
            .map(|c| match c {
                Command::SendHeartbeat {
                    to,
                    term,
                    leader_id,
                    ..
                } => Command::SendHeartbeat {
                    to,
                    term,
                    leader_id,
                    catching_up: listed.clone(),
                },
                other => other,
            })
            .collect::<Vec<_>>()
    );
    // The leader reports 3 caught up (under its new identity): a voter again.
    let mut report = report(1, term.0, Role::Leader, (term.0, 8));
    report.caught_up = vec![(NodeId(3), "uuid-3-wiped".to_string())];
    let out = core.step(Event::HeartbeatOk {
        id: NodeId(1),
        report,
        now_ms: 710,
    });
    let members = members_persisted(&out).expect("promotion is recorded");
    assert!(members[&NodeId(3)].voter);
    assert!(step(&mut core, tick(750)).iter().all(|c| matches!(c,
        Command::SendHeartbeat { catching_up, .. } if catching_up.is_empty())));
}

/// DESIGN rule 10: a caught-up report for another identity (the server was wiped again
/// meanwhile), or from a server that does not lead the current term, promotes nobody.
#[test]
fn only_the_leader_promotes_and_only_the_identity_it_checked() {
    let mut core = stable_cluster(3);
    core.step(with_uuid(
        heartbeat_ok(3, 1, Role::Follower, 10),
        "uuid-3-b",
    ));
    let mut from_follower = report(2, 1, Role::Follower, (1, 3));
    from_follower.caught_up = vec![(NodeId(3), "uuid-3-b".to_string())];
    let out = core.step(Event::HeartbeatOk {
        id: NodeId(2),
        report: from_follower,
        now_ms: 20,
    });
    assert_eq!(members_persisted(&out), None);
    let mut old_identity = report(1, 1, Role::Leader, (1, 3));
    old_identity.caught_up = vec![(NodeId(3), "uuid-3".to_string())];
    let out = core.step(Event::HeartbeatOk {
        id: NodeId(1),
        report: old_identity,
        now_ms: 30,
    });
    assert_eq!(members_persisted(&out), None);
    assert!(!core.members()[&NodeId(3)].voter);
}

/// DESIGN rule 10: a directory that was never in a cluster, joining a cluster that has terms
/// and that the coord has no record of, catches up first (the coord cannot know it is new).
#[test]
fn a_new_directory_joining_a_cluster_with_terms_catches_up() {
    let mut core = CoordCore::new(config(3, WaitFor::All), Term(4), 0);
    let mut r = report(2, 0, Role::Follower, (0, 0));
    r.new_storage = true;
    let out = core.step(Event::Joined {
        id: NodeId(2),
        report: r,
        now_ms: 0,
    });
    assert!(!members_persisted(&out).expect("recorded")[&NodeId(2)].voter);
    let out = core.step(joined(1, 4, Role::Follower, 0));
    assert!(members_persisted(&out).expect("recorded")[&NodeId(1)].voter);
}

/// DESIGN rule 10 with unauthenticated Joins: a Join naming another storage identity (anyone
/// can send one) changes no record; the answer to the coord's own heartbeat does.
#[test]
fn only_a_heartbeat_answer_changes_a_storage_record() {
    let mut core = stable_cluster(3);
    let mut forged = report(2, 1, Role::Follower, (1, 3));
    forged.uuid = "forged".into();
    let out = core.step(Event::Joined {
        id: NodeId(2),
        report: forged,
        now_ms: 10,
    });
    assert_eq!(members_persisted(&out), None);
    assert!(core.members()[&NodeId(2)].voter);
    let out = core.step(with_uuid(heartbeat_ok(2, 1, Role::Follower, 20), "wiped"));
    assert!(!members_persisted(&out).expect("recorded")[&NodeId(2)].voter);
}

/// Rule 1 with unauthenticated Joins: a Join claiming the largest term, or claiming to lead,
/// neither raises the coord's term (which would leave no term to issue) nor gets adopted.
#[test]
fn a_join_cannot_raise_the_term_or_name_a_leader() {
    let mut core = CoordCore::new(config(3, WaitFor::All), Term(4), 0);
    let out = core.step(Event::Joined {
        id: NodeId(1),
        report: report(1, u64::MAX, Role::Leader, (4, 9)),
        now_ms: 0,
    });
    assert!(
        !out.iter().any(|c| matches!(c, Command::PersistTerm(_))),
        "{out:?}"
    );
    assert_eq!(core.highest_term(), Term(4));
    step(&mut core, joined(2, 4, Role::Leader, 0));
    assert_eq!(core.view().leader, NodeId::NONE, "not adopted from a Join");
    step(&mut core, heartbeat_ok(2, 4, Role::Leader, 10));
    assert_eq!(
        core.view(),
        &view(4, 2),
        "adopted from the heartbeat answer"
    );
}

/// DESIGN section 4: a leader whose address refuses the connection (its process is gone) is
/// failed at once, without waiting out the failure timeout; a follower refusing is marked
/// failed and alive again on its next answer.
#[test]
fn a_refused_connection_fails_the_server_at_once() {
    let mut core = stable_cluster(3);
    step(&mut core, heartbeat_ok(3, 1, Role::Follower, 10));
    assert!(step(&mut core, Event::ServerGone { id: NodeId(3) }).is_empty());
    assert!(!core.is_alive(NodeId(3)));
    step(&mut core, heartbeat_ok(3, 1, Role::Follower, 20));
    assert!(core.is_alive(NodeId(3)));
    let out = step(&mut core, Event::ServerGone { id: NodeId(1) });
    assert_eq!(
        out,
        epoch_start(2, 3),
        "an epoch change at 20 ms, not at 300"
    );
}

/// Rule 1 at the end of the term space: a server holding term 2^64 - 1 (only a forged message
/// can have put it there) makes the coord record that term, and then refuse to start an epoch
/// change rather than wrap to a term already used.
#[test]
fn the_coord_never_issues_a_term_past_the_largest() {
    let mut core = stable_cluster(3);
    let out = step(
        &mut core,
        Event::PrepareRejected {
            id: NodeId(2),
            term: Term(u64::MAX),
        },
    );
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(core.highest_term(), Term(1));
    let mut core = CoordCore::new(config(3, WaitFor::All), Term(4), 0);
    let out = step(&mut core, heartbeat_ok(1, u64::MAX, Role::Follower, 0));
    assert_eq!(out.first(), Some(&Command::PersistTerm(Term(u64::MAX))));
    step(&mut core, heartbeat_ok(2, u64::MAX, Role::Follower, 0));
    step(&mut core, heartbeat_ok(3, u64::MAX, Role::Follower, 0));
    for t in (50..2_000).step_by(50) {
        let out = step(&mut core, tick(t));
        assert!(
            !out.iter()
                .any(|c| matches!(c, Command::PersistTerm(_) | Command::SendPrepare { .. })),
            "{out:?}"
        );
    }
    assert_eq!(core.highest_term(), Term(u64::MAX));
}
