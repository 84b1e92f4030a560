//! One test per case the end-to-end tests cover, on the plan alone: each
//! asserts the steps, in order.

use super::*;
use crate::{
    desired::{ADDRESS_ANNOTATION, FORWARD_METHOD_ANNOTATION, POOL_ANNOTATION},
    fixtures::{mk_entry, mk_ip, mk_key, mk_legacy, mk_service},
};

use Step::*;

fn mk_settings() -> Settings {
    Settings::default()
}

fn mk_apply(svc: &Service) -> Apply {
    mk_apply_with(svc, &Adoptable::default())
}

fn mk_apply_with(svc: &Service, adoptable: &Adoptable) -> Apply {
    mk_apply_in(svc, &mk_settings(), adoptable)
}

fn mk_apply_in(svc: &Service, settings: &Settings, adoptable: &Adoptable) -> Apply {
    match plan(svc, settings, adoptable) {
        Plan::Apply(a) => a,
        other => panic!("expected Apply, got {other:?}"),
    }
}

fn mk_cleanup(svc: &Service, settings: &Settings) -> Cleanup {
    match plan(svc, settings, &Adoptable::default()) {
        Plan::Cleanup(c) => c,
        other => panic!("expected Cleanup, got {other:?}"),
    }
}

/// The steps of a Service with the annotation, which is refused.
fn mk_refused(key: &str, value: &str) -> Vec<Step> {
    let svc = mk_service("web").annotation(key, value).build();
    match plan(&svc, &mk_settings(), &Adoptable::default()) {
        Plan::Refuse(steps) => steps,
        other => panic!("expected Refuse, got {other:?}"),
    }
}

fn mk_allocated(ip: &str, pool: &str) -> Allocated {
    Allocated {
        ip: mk_ip(ip),
        pool: pool.into(),
    }
}

fn ask(address: Option<&str>, pool: Option<&str>) -> Request {
    Request {
        address: address.map(mk_ip),
        pool: pool.map(Into::into),
        adopt: false,
        moving: false,
    }
}

/// A request to move to `address`: the held address is released in the
/// same write.
fn move_to(address: &str) -> Request {
    Request {
        moving: true,
        ..ask(Some(address), None)
    }
}

fn keep(address: &str) -> Request {
    Request::keep(mk_ip(address))
}

/// The steps after a first answer of `ip` from `pool`, which no other
/// Service holds.
fn mk_answered(p: &Apply, ip: &str, pool: &str) -> Vec<Step> {
    p.outcome(Ok(&mk_allocated(ip, pool)), None)
}

/// The first steps after an answer of `ip`: the allocation-failed Events
/// forgotten, the entry (of shop/web, without a forward method) recorded
/// and counted.
fn recorded(ip: &str) -> [Step; 3] {
    [
        ClearReason(reason::ALLOCATION_FAILED),
        RecordEntry {
            ip: mk_ip(ip),
            entry: mk_entry("shop", "web", None),
        },
        CountManaged,
    ]
}

/// The ConfigMap entry the steps record.
fn recorded_entry(steps: &[Step]) -> &Entry {
    match steps {
        [
            ClearReason(reason::ALLOCATION_FAILED),
            RecordEntry { entry, .. },
            ..,
        ] => entry,
        other => panic!("expected an entry recorded, got {other:?}"),
    }
}

/// The Events the steps publish.
fn published(steps: &[Step]) -> Vec<&Note> {
    steps
        .iter()
        .filter_map(|s| match s {
            PublishEvent(note) => Some(note),
            _ => None,
        })
        .collect()
}

/// The one Warning the steps publish, of `reason`.
fn the_warning<'a>(steps: &'a [Step], reason: &str) -> &'a Note {
    let warnings: Vec<&Note> = published(steps)
        .into_iter()
        .filter(|n| n.type_ == EventType::Warning)
        .collect();
    assert_eq!(warnings.len(), 1, "{steps:?}");
    assert_eq!(warnings[0].reason, reason);
    warnings[0]
}

/// The Event announcing a new address in the status, if the steps write one.
fn announced(steps: &[Step]) -> Option<&Note> {
    let mut found = steps.windows(2).filter_map(|w| match w {
        [PatchStatus(Some(_)), PublishEvent(note)] => Some(note),
        _ => None,
    });
    let note = found.next();
    assert_eq!(found.next(), None, "{steps:?}");
    note
}

/// The Event announcing a first answer of `ip` from `pool`.
fn announcement(p: &Apply, ip: &str, pool: &str) -> String {
    let steps = mk_answered(p, ip, pool);
    announced(&steps).expect("an Event").message.clone()
}

/// The Event of a failed allocation.
fn failed_note(error: &AllocError) -> Step {
    PublishEvent(Note::warning(
        reason::ALLOCATION_FAILED,
        "Allocate",
        error.to_string(),
    ))
}

#[test]
fn a_new_service_gets_the_finalizer_adoption_first_and_any_address_of_the_default_pool() {
    let p = mk_apply(&mk_service("web").build());
    assert_eq!(
        p.steps,
        [
            ClearReason(reason::INVALID_ANNOTATION),
            AddFinalizer,
            AdoptAll,
            Allocate(ask(None, None)),
        ],
        "a new address only after adoption"
    );
    assert_eq!(p.status, None);
    assert_eq!(Plan::Apply(p.clone()).steps(), p.steps);
}

#[test]
fn a_new_address_is_recorded_written_to_the_status_and_announced_with_its_pool() {
    let p = mk_apply(&mk_service("web").build());
    let steps = mk_answered(&p, "10.0.0.1", "default");
    let [first @ .., PatchStatus(ip), PublishEvent(note)] = &steps[..5] else {
        panic!("expected the entry, then the status, then the Event: {steps:?}");
    };
    assert_eq!(first, recorded("10.0.0.1"));
    assert_eq!(recorded_entry(&steps).value(), "shop/web");
    assert_eq!(*ip, Some(mk_ip("10.0.0.1")));
    assert_eq!(note.type_, EventType::Normal);
    assert_eq!(note.reason, reason::ALLOCATED);
    assert_eq!(note.message, "allocated 10.0.0.1 from pool default");
    assert_eq!(
        steps[5..],
        [
            ClearReason(reason::PORT_REWRITE),
            ClearReason(reason::OUTSIDE_POOLS),
            SettleWrites
        ]
    );
    assert_eq!(
        announcement(&p, "192.0.2.7", ""),
        "allocated 192.0.2.7 outside every pool"
    );
}

#[test]
fn a_service_with_its_address_in_status_keeps_it_and_writes_nothing() {
    let svc = mk_service("web").finalized().status("10.0.0.1").build();
    let p = mk_apply(&svc);
    assert_eq!(
        p.steps,
        [
            ClearReason(reason::INVALID_ANNOTATION),
            Allocate(keep("10.0.0.1"))
        ],
        "what is in use is adopted"
    );
    let steps = p.outcome(
        Ok(&mk_allocated("10.0.0.1", "default")),
        Some(&mk_key("web")),
    );
    let mut want = recorded("10.0.0.1").to_vec();
    want.extend([
        ClearReason(reason::PORT_REWRITE),
        ClearReason(reason::OUTSIDE_POOLS),
        SettleWrites,
    ]);
    assert_eq!(steps, want, "no status write, no Event");
}

#[test]
fn the_forward_method_goes_into_the_entry() {
    let svc = mk_service("web")
        .annotation(FORWARD_METHOD_ANNOTATION, "dr")
        .build();
    let steps = mk_answered(&mk_apply(&svc), "10.0.0.1", "default");
    assert_eq!(recorded_entry(&steps).value(), "shop/web:DR");
}

#[test]
fn a_requested_address_is_asked_for_without_adopting_first() {
    for svc in [
        mk_service("web")
            .annotation(ADDRESS_ANNOTATION, "10.0.0.7")
            .build(),
        mk_service("web").load_balancer_ip("10.0.0.7").build(),
    ] {
        assert_eq!(
            mk_apply(&svc).steps,
            [
                ClearReason(reason::INVALID_ANNOTATION),
                AddFinalizer,
                Allocate(ask(Some("10.0.0.7"), None)),
            ]
        );
    }
}

#[test]
fn a_requested_pool_is_asked_for() {
    let svc = mk_service("web").annotation(POOL_ANNOTATION, "dmz").build();
    assert_eq!(
        mk_apply(&svc).steps,
        [
            ClearReason(reason::INVALID_ANNOTATION),
            AddFinalizer,
            AdoptAll,
            Allocate(ask(None, Some("dmz"))),
        ]
    );
}

#[test]
fn a_requested_address_other_than_the_status_is_a_move_and_an_equal_one_is_kept() {
    for (want, moves) in [("10.0.0.9", true), ("10.0.0.1", false)] {
        let svc = mk_service("web")
            .finalized()
            .status("10.0.0.1")
            .annotation(ADDRESS_ANNOTATION, want)
            .build();
        let p = mk_apply(&svc);
        let steps = if moves {
            vec![Allocate(move_to(want))]
        } else {
            vec![Allocate(keep(want))]
        };
        assert_eq!(p.steps[0], ClearReason(reason::INVALID_ANNOTATION));
        assert_eq!(p.steps[1..], steps, "{want}");
    }
}

#[test]
fn a_moved_service_announces_its_new_address() {
    let svc = mk_service("web")
        .finalized()
        .status("10.0.0.1")
        .annotation(ADDRESS_ANNOTATION, "10.0.0.9")
        .build();
    assert_eq!(
        announcement(&mk_apply(&svc), "10.0.0.9", "default"),
        "allocated 10.0.0.9 from pool default"
    );
}

/// The steps of a served clean-up after the release of `released`: the
/// entry, the ConfigMap, the status (`clear_status`), the finalizer, the
/// Event; then, for a deleted Service, its Events forgotten.
fn cleaned_up(released: Option<&str>, clear_status: bool, deleting: bool) -> Vec<Step> {
    let mut steps = vec![
        MarkCleaning,
        DropEntry,
        CountManaged,
        WaitConfigMapPublished,
    ];
    steps.extend(clear_status.then_some(PatchStatus(None)));
    steps.extend([RemoveFinalizer, UnmarkCleaning]);
    if let Some(ip) = released {
        let note = Note::normal(reason::RELEASED, "Release", format!("released {ip}"));
        steps.extend([PublishEvent(note), WakeWaiting]);
    }
    steps.extend(deleting.then_some(ForgetEvents));
    steps.push(SettleWrites);
    steps
}

#[test]
fn a_deleted_service_with_the_finalizer_is_cleaned_up_and_its_events_forgotten() {
    let svc = mk_service("web")
        .finalized()
        .status("10.0.0.1")
        .deleting()
        .build();
    let c = mk_cleanup(&svc, &mk_settings());
    assert_eq!(Plan::Cleanup(c.clone()).steps(), [Release]);
    assert_eq!(
        c.released(None, false, false),
        cleaned_up(None, false, true),
        "a deleted Service's status is not written"
    );
    let steps = c.released(Some(mk_ip("10.0.0.1")), false, false);
    assert_eq!(steps, cleaned_up(Some("10.0.0.1"), false, true));
    let note = published(&steps)[0];
    assert_eq!(note.reason, reason::RELEASED);
    assert_eq!(note.message, "released 10.0.0.1");
}

#[test]
fn a_deleted_service_without_the_finalizer_is_left_alone() {
    let svc = mk_service("web").deleting().build();
    let p = plan(&svc, &mk_settings(), &Adoptable::default());
    assert_eq!(p, Plan::Ignore);
    assert_eq!(p.steps(), []);
}

#[test]
fn a_service_no_longer_a_load_balancer_clears_its_status_only_if_this_syncer_served_it() {
    let svc = mk_service("web")
        .finalized()
        .status("10.0.0.1")
        .type_("ClusterIP")
        .build();
    let c = mk_cleanup(&svc, &mk_settings());
    assert_eq!(
        c.released(None, false, false),
        [LeaveFinalizer],
        "another may hold the finalizer"
    );
    assert_eq!(
        c.released(Some(mk_ip("10.0.0.1")), false, false),
        cleaned_up(Some("10.0.0.1"), true, false)
    );
    for (indexed, cleaning) in [(true, false), (false, true)] {
        assert_eq!(
            c.released(None, indexed, cleaning),
            cleaned_up(None, true, false)
        );
    }
}

#[test]
fn a_former_load_balancer_with_an_address_from_before_vipam_was_served() {
    let svc = mk_service("web").finalized().type_("ClusterIP").build();
    let adoptable = Adoptable::new([mk_legacy("uid-web", "10.0.0.3")]);
    let Plan::Cleanup(c) = plan(&svc, &mk_settings(), &adoptable) else {
        panic!("expected Cleanup");
    };
    assert_eq!(
        c.released(None, false, false),
        cleaned_up(None, false, false)
    );
}

#[test]
fn services_of_another_class_are_never_touched() {
    let with_class = Settings {
        load_balancer_class: Some("vipam.io/keepalived".into()),
        ..Default::default()
    };
    let foreign = [
        (
            mk_service("a").class("other").finalized().build(),
            mk_settings(),
        ),
        (
            mk_service("b").class("other").finalized().build(),
            with_class.clone(),
        ),
        (
            mk_service("c").finalized().status("10.0.0.1").build(),
            with_class.clone(),
        ),
        (
            mk_service("d")
                .class("other")
                .finalized()
                .deleting()
                .build(),
            mk_settings(),
        ),
        (
            mk_service("e")
                .class("other")
                .type_("ClusterIP")
                .finalized()
                .build(),
            with_class.clone(),
        ),
    ];
    for (svc, settings) in foreign {
        assert_eq!(
            plan(&svc, &settings, &Adoptable::default()),
            Plan::Ignore,
            "{:?}",
            svc.metadata.name
        );
    }
    let ours = mk_service("f").class("vipam.io/keepalived").build();
    assert!(matches!(
        plan(&ours, &with_class, &Adoptable::default()),
        Plan::Apply(_)
    ));
}

#[test]
fn a_requested_ipv6_address_is_refused_with_an_event_and_nothing_else() {
    let steps = mk_refused(ADDRESS_ANNOTATION, "2001:db8::1");
    let note = the_warning(&steps, reason::IPV6_NOT_SUPPORTED);
    assert_eq!(
        steps,
        [
            ClearReason(reason::INVALID_ANNOTATION),
            PublishEvent(note.clone())
        ]
    );
    assert!(note.message.contains("2001:db8::1"), "{}", note.message);
}

#[test]
fn an_ipv6_address_from_a_pool_is_released_with_an_event_naming_the_pool() {
    let p = mk_apply(&mk_service("web").annotation(POOL_ANNOTATION, "v6").build());
    let steps = mk_answered(&p, "2001:db8::2", "v6");
    let [
        ClearReason(reason::ALLOCATION_FAILED),
        Release,
        PublishEvent(note),
        DropEntry,
    ] = &steps[..]
    else {
        panic!("expected a release, its Event and the entry dropped: {steps:?}");
    };
    assert_eq!(note.reason, reason::IPV6_NOT_SUPPORTED);
    assert!(
        note.message.starts_with("2001:db8::2 from pool v6 is IPv6"),
        "{}",
        note.message
    );
}

#[test]
fn an_invalid_address_annotation_is_refused_with_an_event_naming_the_value() {
    let steps = mk_refused(ADDRESS_ANNOTATION, "10.0.0.300");
    let note = the_warning(&steps, reason::INVALID_ANNOTATION);
    assert_eq!(steps, [PublishEvent(note.clone())], "nothing is cleared");
    assert!(note.message.contains("\"10.0.0.300\""), "{}", note.message);
}

#[test]
fn an_invalid_forward_method_warns_and_still_allocates() {
    let svc = mk_service("web")
        .annotation(FORWARD_METHOD_ANNOTATION, "TUN")
        .build();
    let p = mk_apply(&svc);
    let note = the_warning(&p.steps, reason::INVALID_ANNOTATION);
    assert_eq!(
        p.steps,
        [
            PublishEvent(note.clone()),
            AddFinalizer,
            AdoptAll,
            Allocate(ask(None, None))
        ],
        "the warning stays published"
    );
    assert!(note.message.contains("\"TUN\""), "{}", note.message);
}

#[test]
fn a_service_without_status_keeps_its_address_from_before_vipam() {
    let adoptable = Adoptable::new([mk_legacy("uid-web", "10.0.0.3")]);
    let p = mk_apply_with(&mk_service("web").build(), &adoptable);
    assert_eq!(
        p.steps,
        [
            ClearReason(reason::INVALID_ANNOTATION),
            AddFinalizer,
            Allocate(keep("10.0.0.3"))
        ]
    );
    assert_eq!(
        announcement(&p, "10.0.0.3", "default"),
        "adopted 10.0.0.3 from pool default"
    );
}

#[test]
fn the_status_wins_over_an_address_from_before_vipam() {
    let adoptable = Adoptable::new([mk_legacy("uid-web", "10.0.0.3")]);
    let svc = mk_service("web").finalized().status("10.0.0.1").build();
    let p = mk_apply_with(&svc, &adoptable);
    assert_eq!(p.steps.last(), Some(&Allocate(keep("10.0.0.1"))));
    assert_eq!(p.adopted, None);
}

#[test]
fn an_address_another_service_holds_is_stale() {
    let p = mk_apply(&mk_service("web").build());
    let steps = p.outcome(
        Ok(&mk_allocated("10.0.0.1", "default")),
        Some(&mk_key("db")),
    );
    assert_eq!(
        steps,
        [
            ClearReason(reason::ALLOCATION_FAILED),
            GiveBack,
            RequireAdoption,
            FailStale {
                ip: mk_ip("10.0.0.1"),
                holder: mk_key("db")
            }
        ]
    );
}

#[test]
fn a_full_pool_waits_for_a_release_an_unreachable_allocator_requires_adoption_and_a_refusal_is_reported()
 {
    let p = mk_apply(&mk_service("web").build());
    let full = AllocError::Exhausted("pool \"default\" has no free address".into());
    assert_eq!(
        p.outcome(Err(&full), None),
        [WaitForRelease, failed_note(&full), Fail(full.clone())]
    );
    let down = AllocError::Unreachable("connection refused".into());
    assert_eq!(
        p.outcome(Err(&down), None),
        [RequireAdoption, failed_note(&down), Fail(down.clone())]
    );
    for refused in [
        AllocError::Held("10.0.0.7 is held by shop/db".into()),
        AllocError::UnknownPool("no pool \"dmz\"".into()),
    ] {
        assert_eq!(
            p.outcome(Err(&refused), None),
            [failed_note(&refused), Fail(refused.clone())],
            "{refused}"
        );
    }
}

/// The forward-method, port-rewrite, outside-pools and refusal rules.
mod warnings;

/// What the plan adds after each answer.
mod answers;
