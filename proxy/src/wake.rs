//! A list of task wakers that an event wakes all at once (a credential publish, shutdown),
//! where each waiting task keeps one slot for its whole life: cheaper per wait than a
//! `watch`/`Notify` future (which registers anew each time it is created and is 100–200
//! bytes in every idle session's future).

use std::sync::Mutex;
use std::task::Waker;

use slab::Slab;

/// The wakers of the tasks waiting for one kind of event.
#[derive(Default)]
pub struct WakerList {
    wakers: Mutex<Slab<Waker>>,
}

/// A waiter's place in a [`WakerList`]: its slot and the waker stored there (kept to skip the
/// lock when the task's waker is the same); none until first registered. Give it back with
/// [`WakerList::remove`].
#[derive(Default)]
pub struct WakerSlot(Option<(usize, Waker)>);

impl WakerList {
    /// Makes sure `waker` is woken by the next [`WakerList::wake_all`]. Returns whether the
    /// list was empty before (the slot was new to it).
    pub fn register(&self, slot: &mut WakerSlot, waker: &Waker) -> bool {
        if let Some((_, w)) = &slot.0
            && w.will_wake(waker)
        {
            return false;
        }
        let mut wakers = crate::lock(&self.wakers);
        let first = slot.0.is_none() && wakers.is_empty();
        let index = match &slot.0 {
            Some((i, _)) => {
                wakers[*i] = waker.clone();
                *i
            }
            None => wakers.insert(waker.clone()),
        };
        slot.0 = Some((index, waker.clone()));
        first
    }

    /// Leaves the list.
    pub fn remove(&self, slot: &mut WakerSlot) {
        if let Some((i, _)) = slot.0.take() {
            crate::lock(&self.wakers).try_remove(i);
        }
    }

    /// Wakes every registered task (they stay registered).
    pub fn wake_all(&self) {
        for (_, waker) in crate::lock(&self.wakers).iter() {
            waker.wake_by_ref();
        }
    }

    /// How many tasks are registered.
    pub fn len(&self) -> usize {
        crate::lock(&self.wakers).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
