//! The ONI testbed: a small procedurally generated text adventure with a
//! sparse reward.
//!
//! A world is a chain of `rooms` rooms laid out on a grid (each room joined to
//! the next by an exit in one of the four directions). The last room holds the
//! treasure behind a locked door; the key lies in one of the other rooms, and a
//! distractor item in another. The agent starts in the first room and has
//! `max_turns` commands. Reward is 1 when it enters the treasure room and 0
//! otherwise — nothing in between, which is what makes the task hard without
//! an intrinsic reward.
//!
//! Commands are read from their first letter, so one-letter actions work for a
//! tiny character-level policy and whole words for a real model: `n s e w`
//! (move), `t` / `take`, `o` / `open`. Anything else: "Nothing happens."
//! Every step emits its message as a caption (e.g. "You take the key."),
//! which is what the ONI annotator judges.
//!
//! `layouts` bounds the number of distinct worlds (problem `i` is world
//! `i mod layouts`, for both splits: evaluation then measures how often the
//! policy solves the worlds it trains in). With `layouts = 0` every problem
//! is a new world and the eval split draws from another stream (held-out worlds).
//! A problem's `answer` is its world's seed in hex, from which
//! [`Adventure::episode`] rebuilds the world; its verifier is unused.

use std::collections::HashMap;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{problem_rng, Episode, Problem, Split, Task, Turn, Verifier};
use crate::config::AdventureConfig;
use crate::error::{Error, Result};

const ROOM_NAMES: &[&str] =
    &["hall", "cellar", "kitchen", "library", "garden", "tower", "attic", "crypt", "study", "chapel", "armory", "pantry"];
const DISTRACTORS: &[&str] = &["lamp", "coin", "rope", "map", "cup"];
const DIRS: [(char, &str, (i32, i32)); 4] = [('n', "north", (0, 1)), ('s', "south", (0, -1)), ('e', "east", (1, 0)), ('w', "west", (-1, 0))];

#[derive(Debug, Clone)]
pub struct Adventure {
    cfg: AdventureConfig,
}

impl Adventure {
    pub fn new(cfg: AdventureConfig) -> Result<Self> {
        if !(2..=ROOM_NAMES.len()).contains(&cfg.rooms) {
            return Err(Error::config("task.rooms", format!("must be between 2 and {}", ROOM_NAMES.len())));
        }
        if !(1..=64).contains(&cfg.max_turns) {
            return Err(Error::config("task.max_turns", "must be between 1 and 64"));
        }
        Ok(Adventure { cfg })
    }

    /// The world a problem's `answer` names.
    pub fn world(&self, problem: &Problem) -> World {
        let seed = u64::from_str_radix(&problem.answer, 16).unwrap_or(0);
        World::generate(self.cfg.rooms, seed)
    }
}

impl Task for Adventure {
    fn name(&self) -> &str {
        "adventure"
    }

    fn problem(&self, split: Split, index: u64) -> Problem {
        let seed: u64 = if self.cfg.layouts > 0 {
            problem_rng(self.cfg.seed, Split::Train, index % self.cfg.layouts).gen()
        } else {
            problem_rng(self.cfg.seed, split, index).gen()
        };
        let world = World::generate(self.cfg.rooms, seed);
        Problem {
            id: index,
            prompt: format!("Find the treasure. Commands: n s e w take open.\n{}\n>", world.describe(0)),
            answer: format!("{seed:x}"),
            verifier: Verifier::Exact,
            messages: vec![],
        }
    }

    fn episode(&self, problem: &Problem) -> Option<Box<dyn Episode>> {
        Some(Box::new(self.world(problem)))
    }

    fn max_turns(&self) -> usize {
        self.cfg.max_turns
    }
}

/// One world and the agent's state in it.
#[derive(Debug, Clone)]
pub struct World {
    names: Vec<&'static str>,
    /// exits[room][direction letter] = neighbour.
    exits: Vec<HashMap<char, usize>>,
    /// Items lying in each room.
    items: Vec<Vec<&'static str>>,
    /// The door into the last room is locked until opened with the key.
    locked: bool,
    at: usize,
    inventory: Vec<&'static str>,
    done: bool,
}

impl World {
    /// A chain of `rooms` rooms on a self-avoiding grid walk (retried until it fits).
    pub fn generate(rooms: usize, seed: u64) -> World {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dirs = 'walk: loop {
            let mut cells = vec![(0i32, 0i32)];
            let mut dirs_taken = Vec::new();
            for _ in 1..rooms {
                let last = *cells.last().expect("one cell");
                let free: Vec<usize> =
                    (0..4).filter(|&d| !cells.contains(&(last.0 + DIRS[d].2 .0, last.1 + DIRS[d].2 .1))).collect();
                let Some(&d) = free.choose(&mut rng) else { continue 'walk };
                cells.push((last.0 + DIRS[d].2 .0, last.1 + DIRS[d].2 .1));
                dirs_taken.push(d);
            }
            break dirs_taken;
        };
        let mut exits = vec![HashMap::new(); rooms];
        for (i, &d) in dirs.iter().enumerate() {
            let back = [1, 0, 3, 2][d];
            exits[i].insert(DIRS[d].0, i + 1);
            exits[i + 1].insert(DIRS[back].0, i);
        }
        let mut names: Vec<&'static str> = ROOM_NAMES.to_vec();
        names.shuffle(&mut rng);
        names.truncate(rooms);
        let mut items = vec![Vec::new(); rooms];
        items[rng.gen_range(0..rooms - 1)].push("key");
        items[rng.gen_range(0..rooms - 1)].push(DISTRACTORS[rng.gen_range(0..DISTRACTORS.len())]);
        World { names, exits, items, locked: true, at: 0, inventory: Vec::new(), done: false }
    }

    fn describe(&self, room: usize) -> String {
        let mut exits: Vec<char> = self.exits[room].keys().copied().collect();
        exits.sort_by_key(|c| "nsew".find(*c));
        let exits: String = exits.iter().map(|c| format!(" {c}")).collect();
        let mut s = format!("{}. Exits:{exits}.", capitalise(self.names[room]));
        for item in &self.items[room] {
            s.push_str(&format!(" A {item} is here."));
        }
        s
    }

    /// The door into the treasure room, when it leaves `room`: its direction.
    fn door_from(&self, room: usize) -> Option<char> {
        let last = self.names.len() - 1;
        self.exits[room].iter().find(|(_, &to)| to == last).map(|(&d, _)| d)
    }

    /// The shortest command sequence that wins from the start (tests and demonstrations).
    pub fn solution(&self) -> Vec<String> {
        let key_room = self.items.iter().position(|i| i.contains(&"key")).expect("a key");
        let last = self.names.len() - 1;
        let mut out = Vec::new();
        let walk = |from: usize, to: usize, out: &mut Vec<String>| {
            let mut at = from;
            while at != to {
                let next = if to > at { at + 1 } else { at - 1 };
                let d = self.exits[at].iter().find(|(_, &n)| n == next).map(|(&d, _)| d).expect("chain");
                out.push(d.to_string());
                at = next;
            }
        };
        walk(0, key_room, &mut out);
        out.push("t".into());
        walk(key_room, last - 1, &mut out);
        out.push("o".into());
        out.push(self.door_from(last - 1).expect("door").to_string());
        out
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

impl Episode for World {
    fn step(&mut self, action: &str) -> Turn {
        if self.done {
            return Turn { observation: String::new(), reward: 0.0, done: true, captions: Vec::new() };
        }
        let last = self.names.len() - 1;
        let command = action.trim().chars().next().map(|c| c.to_ascii_lowercase());
        let message = match command {
            Some(d @ ('n' | 's' | 'e' | 'w')) => match self.exits[self.at].get(&d).copied() {
                None => "You can't go that way.".to_string(),
                Some(to) if to == last && self.locked => "The door is locked.".to_string(),
                Some(to) if to == last => {
                    self.at = to;
                    self.done = true;
                    format!("You enter the {} and find the treasure!", self.names[to])
                }
                Some(to) => {
                    self.at = to;
                    format!("You enter the {}.", self.names[to])
                }
            },
            // Takes the first item listed in the room.
            Some('t') => match (!self.items[self.at].is_empty()).then(|| self.items[self.at].remove(0)) {
                Some(item) => {
                    self.inventory.push(item);
                    format!("You take the {item}.")
                }
                None => "There is nothing to take.".to_string(),
            },
            Some('o') => match (self.door_from(self.at), self.locked) {
                (Some(_), true) if self.inventory.contains(&"key") => {
                    self.locked = false;
                    "You unlock the door with the key.".to_string()
                }
                (Some(_), true) => "The door is locked and you have no key.".to_string(),
                (Some(_), false) => "The door is already open.".to_string(),
                (None, _) => "There is no door here.".to_string(),
            },
            _ => "Nothing happens.".to_string(),
        };
        let observation =
            if self.done { format!("\n{message}\n") } else { format!("\n{message} {}\n>", self.describe(self.at)) };
        Turn { observation, reward: if self.done { 1.0 } else { 0.0 }, done: self.done, captions: vec![message] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdventureConfig;

    fn task(rooms: usize) -> Adventure {
        Adventure::new(AdventureConfig { rooms, max_turns: 12, layouts: 0, seed: 7 }).unwrap()
    }

    #[test]
    fn the_solution_wins_and_only_the_goal_pays() {
        for rooms in 2..=6 {
            let t = task(rooms);
            for i in 0..50 {
                let p = t.problem(Split::Train, i);
                let mut w = t.world(&p);
                let plan = w.solution();
                let mut total = 0.0;
                for (k, a) in plan.iter().enumerate() {
                    let turn = w.step(a);
                    total += turn.reward;
                    assert_eq!(turn.done, k + 1 == plan.len(), "rooms {rooms} world {i} step {k}: {turn:?}");
                    assert_eq!(turn.captions.len(), 1);
                }
                assert_eq!(total, 1.0);
            }
        }
    }

    #[test]
    fn the_door_needs_the_key_and_bad_commands_do_nothing() {
        let t = task(2);
        let p = t.problem(Split::Train, 3);
        let mut w = t.world(&p);
        // Two rooms: key and distractor lie in the first; the door leads to the second.
        let door = w.door_from(0).unwrap().to_string();
        assert_eq!(w.step("x").captions, vec!["Nothing happens."]);
        assert_eq!(w.step(&door).captions, vec!["The door is locked."]);
        assert_eq!(w.step("open").captions, vec!["The door is locked and you have no key."]);
        while !w.inventory.contains(&"key") {
            assert!(w.step("take").captions[0].starts_with("You take the"));
        }
        assert_eq!(w.step("o").captions, vec!["You unlock the door with the key."]);
        let last = w.step(&door);
        assert!(last.done && last.reward == 1.0, "{last:?}");
        assert!(w.step("n").done);
    }

    #[test]
    fn worlds_are_deterministic_and_layouts_repeat() {
        let t = Adventure::new(AdventureConfig { rooms: 4, max_turns: 8, layouts: 3, seed: 1 }).unwrap();
        assert_eq!(t.problem(Split::Train, 1).prompt, t.problem(Split::Train, 4).prompt);
        assert_eq!(t.problem(Split::Train, 1).answer, t.problem(Split::Train, 4).answer);
        assert_ne!(t.problem(Split::Train, 1).answer, t.problem(Split::Train, 2).answer);
        assert_eq!(t.problem(Split::Train, 1).answer, t.problem(Split::Eval, 1).answer, "evaluated on its layouts");
        let fresh = task(4);
        assert_ne!(fresh.problem(Split::Train, 1).answer, fresh.problem(Split::Eval, 1).answer);
        assert!(t.problem(Split::Train, 0).prompt.starts_with("Find the treasure."));
    }
}
