//! The plan's warnings and refusals: forward methods, DR port rewrites,
//! addresses outside every pool, and what a refused request means.

use super::*;

/// A Service annotated with the forward method `value`.
fn mk_method(value: &str) -> Service {
    mk_service("web")
        .annotation(FORWARD_METHOD_ANNOTATION, value)
        .build()
}

/// The steps about what a first answer of 10.0.0.1 from `pool` gives: those
/// between its announcement and the last step.
fn given_steps(p: &Apply, pool: &str) -> Vec<Step> {
    let steps = mk_answered(p, "10.0.0.1", pool);
    match &steps[..] {
        [
            _,
            _,
            _,
            PatchStatus(_),
            PublishEvent(_),
            given @ ..,
            SettleWrites,
        ] => given.to_vec(),
        other => panic!("expected an announced address, got {other:?}"),
    }
}

/// The ConfigMap entry a first answer from the default pool gives.
fn entry_of(p: &Apply) -> String {
    recorded_entry(&mk_answered(p, "10.0.0.1", "default")).value()
}

#[test]
fn proxy_without_the_proxy_protocol_mode_warns_and_the_entry_has_the_default_method() {
    let svc = mk_method("PROXY");
    let note = the_warning(&mk_apply(&svc).steps, reason::INVALID_ANNOTATION).clone();
    for word in [
        FORWARD_METHOD_ANNOTATION,
        "\"PROXY\"",
        "proxy-protocol mode",
        desired::PROXY_PROTOCOL_SETTING,
    ] {
        assert!(
            note.message.contains(word),
            "{word:?} not in {}",
            note.message
        );
    }
    assert_eq!(entry_of(&mk_apply(&svc)), "shop/web");
    let nat = Settings {
        default_forward_method: Some(ForwardMethod::Nat),
        ..mk_settings()
    };
    assert_eq!(
        entry_of(&mk_apply_in(&svc, &nat, &Adoptable::default())),
        "shop/web:NAT"
    );
}

#[test]
fn proxy_with_the_proxy_protocol_mode_is_written_without_a_warning() {
    let svc = mk_method("proxy");
    let mode = Settings {
        proxy_protocol_mode: true,
        ..mk_settings()
    };
    let p = mk_apply_in(&svc, &mode, &Adoptable::default());
    assert_eq!(published(&p.steps), Vec::<&Note>::new());
    assert_eq!(entry_of(&p), "shop/web:PROXY");
}

#[test]
fn dr_with_a_port_rewrite_warns_naming_each_pair_and_still_gets_its_address_and_entry() {
    let svc = mk_service("web")
        .annotation(FORWARD_METHOD_ANNOTATION, "DR")
        .port(80, 8080)
        .port(443, 443)
        .port(25, 2525)
        .build();
    let p = mk_apply(&svc);
    assert_eq!(published(&p.steps), Vec::<&Note>::new());
    let given = given_steps(&p, "default");
    let note = the_warning(&given, reason::PORT_REWRITE);
    for word in [
        "port 80 with targetPort 8080",
        "port 25 with targetPort 2525",
        "DR",
        "rewrite",
        "virtual port",
    ] {
        assert!(
            note.message.contains(word),
            "{word:?} not in {}",
            note.message
        );
    }
    assert!(!note.message.contains("443"), "{}", note.message);
    assert_eq!(
        given,
        [
            ClearReason(reason::OUTSIDE_POOLS),
            PublishEvent(note.clone())
        ],
        "the warning is not forgotten"
    );
    assert_eq!(entry_of(&p), "shop/web:DR");
}

#[test]
fn equal_ports_or_another_method_forget_an_earlier_port_rewrite_warning() {
    for svc in [
        mk_service("web")
            .annotation(FORWARD_METHOD_ANNOTATION, "DR")
            .port(80, 80)
            .build(),
        mk_service("web")
            .annotation(FORWARD_METHOD_ANNOTATION, "NAT")
            .port(80, 8080)
            .build(),
    ] {
        assert_eq!(
            given_steps(&mk_apply(&svc), "default"),
            [
                ClearReason(reason::PORT_REWRITE),
                ClearReason(reason::OUTSIDE_POOLS)
            ]
        );
    }
}

#[test]
fn an_address_outside_every_pool_is_kept_with_one_warning_naming_it() {
    // Adopted from the status: kept, not announced again, warned about.
    let svc = mk_service("web").finalized().status("192.0.2.7").build();
    let p = mk_apply(&svc);
    assert_eq!(
        p.steps,
        [
            ClearReason(reason::INVALID_ANNOTATION),
            Allocate(keep("192.0.2.7"))
        ]
    );
    let steps = p.outcome(Ok(&mk_allocated("192.0.2.7", "")), Some(&mk_key("web")));
    let note = the_warning(&steps, reason::OUTSIDE_POOLS);
    assert!(note.message.starts_with("192.0.2.7 "), "{}", note.message);
    let mut want = recorded("192.0.2.7").to_vec();
    want.extend([
        ClearReason(reason::PORT_REWRITE),
        PublishEvent(note.clone()),
        SettleWrites,
    ]);
    assert_eq!(steps, want, "no status write, no announcement");
    assert_eq!(recorded_entry(&steps).value(), "shop/web");
}

#[test]
fn an_address_in_a_pool_forgets_an_earlier_outside_pools_warning() {
    assert_eq!(
        given_steps(&mk_apply(&mk_service("web").build()), "default"),
        [
            ClearReason(reason::PORT_REWRITE),
            ClearReason(reason::OUTSIDE_POOLS)
        ]
    );
}

#[test]
fn a_denied_or_invalid_request_is_a_refusal_of_the_service_with_the_allocators_reason() {
    let p = mk_apply(&mk_service("web").annotation(POOL_ANNOTATION, "dmz").build());
    for refused in [
        AllocError::Denied("pool \"dmz\" admits only owners service:team-a/".into()),
        AllocError::Invalid("address 127.0.0.1 is special-purpose".into()),
        AllocError::Refused("FAILED_PRECONDITION: 10.0.0.0 is the network address".into()),
    ] {
        let steps = p.outcome(Err(&refused), None);
        assert_eq!(
            steps,
            [failed_note(&refused), Fail(refused.clone())],
            "not the allocator being down: {refused}"
        );
        let note = the_warning(&steps, reason::ALLOCATION_FAILED);
        assert_eq!(note.message, refused.to_string());
    }
}

#[test]
fn a_refused_move_and_a_refused_new_request_end_alike_the_held_address_kept() {
    let mover = mk_service("web")
        .finalized()
        .status("10.0.0.1")
        .annotation(ADDRESS_ANNOTATION, "10.0.0.9")
        .build();
    let moving = mk_apply(&mover);
    let fresh = mk_apply(
        &mk_service("web")
            .annotation(ADDRESS_ANNOTATION, "10.0.0.9")
            .build(),
    );
    for refused in [
        AllocError::Held("10.0.0.9 is held by shop/db".into()),
        AllocError::Denied("address 10.0.0.9 is not for owner service:shop/web".into()),
        AllocError::Exhausted("pool \"dmz\" has no free address".into()),
    ] {
        let wait = matches!(refused, AllocError::Exhausted(_)).then_some(WaitForRelease);
        // The allocator refused the move as a whole: nothing to claim back.
        let after: Vec<Step> = wait
            .into_iter()
            .chain([failed_note(&refused), Fail(refused.clone())])
            .collect();
        assert_eq!(moving.outcome(Err(&refused), None), after, "{refused}");
        assert_eq!(fresh.outcome(Err(&refused), None), after, "{refused}");
    }
    // An unreachable allocator may have moved it or not: adopt again.
    let down = AllocError::Unreachable("connection refused".into());
    assert_eq!(
        moving.outcome(Err(&down), None),
        [RequireAdoption, failed_note(&down), Fail(down.clone())]
    );
}
