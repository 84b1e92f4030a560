//! What [`Plan::then`] adds after each answer: the steps that follow the
//! release, the allocation and a claim back, taken before any step still to
//! come.

use super::*;

fn mk_released(released: Result<Option<&str>, AllocError>) -> Answer {
    Answer::Released {
        released: released.map(|ip| ip.map(mk_ip)),
        indexed: false,
        cleaning: false,
    }
}

fn mk_mover() -> Plan {
    let svc = mk_service("web")
        .finalized()
        .status("10.0.0.1")
        .annotation(ADDRESS_ANNOTATION, "10.0.0.9")
        .build();
    plan(&svc, &mk_settings(), &Adoptable::default())
}

fn mk_deleted() -> Plan {
    let svc = mk_service("web")
        .finalized()
        .status("10.0.0.1")
        .deleting()
        .build();
    plan(&svc, &mk_settings(), &Adoptable::default())
}

#[test]
fn a_failed_release_publishes_the_failure_and_ends_the_reconcile() {
    let down = AllocError::Unreachable("connection refused".into());
    let denied = AllocError::Denied("owner service:shop/web is not yours".into());
    for p in [mk_mover(), mk_deleted()] {
        assert_eq!(
            p.then(&mk_released(Err(down.clone()))),
            [RequireAdoption, failed_note(&down), Fail(down.clone())]
        );
        assert_eq!(
            p.then(&mk_released(Err(denied.clone()))),
            [failed_note(&denied), Fail(denied.clone())]
        );
    }
    assert_eq!(failure(&denied), [failed_note(&denied), Fail(denied)]);
}

#[test]
fn a_move_is_one_allocation_that_asks_the_allocator_to_move() {
    let p = mk_mover();
    assert_eq!(p.steps().last(), Some(&Allocate(move_to("10.0.0.9"))));
    assert!(!p.steps().contains(&Release), "no release of its own");
}

#[test]
fn a_clean_up_goes_on_as_its_release_says() {
    let p = mk_deleted();
    let Plan::Cleanup(c) = &p else {
        panic!("expected Cleanup, got {p:?}");
    };
    let answer = Answer::Released {
        released: Ok(Some(mk_ip("10.0.0.1"))),
        indexed: true,
        cleaning: false,
    };
    assert_eq!(
        p.then(&answer),
        c.released(Some(mk_ip("10.0.0.1")), true, false)
    );
}

#[test]
fn the_allocators_answer_decides_what_follows_the_allocation() {
    let p = plan(
        &mk_service("web").build(),
        &mk_settings(),
        &Adoptable::default(),
    );
    let Plan::Apply(a) = &p else {
        panic!("expected Apply, got {p:?}");
    };
    let given = mk_allocated("10.0.0.1", "default");
    let answer = Answer::Allocated(Ok(given.clone()), Some(mk_key("db")));
    assert_eq!(p.then(&answer), a.outcome(Ok(&given), Some(&mk_key("db"))));
    let full = AllocError::Exhausted("pool \"default\" has no free address".into());
    let answer = Answer::Allocated(Err(full.clone()), None);
    assert_eq!(p.then(&answer), a.outcome(Err(&full), None));
}
