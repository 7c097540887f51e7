//! `--placement`: PostgreSQL on CPUs of its own, the load, Redis and the daemon on others, as in
//! production where the database has its cores to itself. Each server is pinned, with every
//! process it started, once it runs (what it starts later inherits its set), the daemon as
//! soon as it is spawned, and the benchmark's own threads (the load) last.

/// The CPU sets of `--placement`, by index of the CPUs this process may use.
pub(crate) struct Placement {
    pub(crate) postgres: Vec<usize>,
    pub(crate) load: Vec<usize>,
    pub(crate) redis: Vec<usize>,
    pub(crate) daemon: Vec<usize>,
}

impl Placement {
    /// Half the CPUs for PostgreSQL, the rest split between the load, Redis and the daemon
    /// (with fewer than four, those three share what is left); `None` with a single CPU.
    pub(crate) fn for_cpus(cpus: &[usize]) -> Option<Placement> {
        if cpus.len() < 2 {
            return None;
        }
        let (postgres, rest) = cpus.split_at(cpus.len() / 2);
        let (load, redis, daemon) = match rest.len() {
            1 | 2 => (rest.to_vec(), rest.to_vec(), rest.to_vec()),
            n => {
                let third = n / 3;
                (
                    rest[..n - 2 * third].to_vec(),
                    rest[n - 2 * third..n - third].to_vec(),
                    rest[n - third..].to_vec(),
                )
            }
        };
        Some(Placement {
            postgres: postgres.to_vec(),
            load,
            redis,
            daemon,
        })
    }

    pub(crate) fn describe(&self) -> String {
        format!(
            "PostgreSQL on CPUs {:?}, the load on {:?}, Redis on {:?}, the daemon on {:?}",
            self.postgres, self.load, self.redis, self.daemon
        )
    }
}

/// The CPUs this process may run on.
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Pins thread `tid` (0: the calling one) to `cpus`.
fn pin(tid: libc::pid_t, cpus: &[usize]) {
    // SAFETY: as in `allowed_cpus`; the set is built from CPU indexes below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Pins process `pid`, every thread of it and every process it started (a PostgreSQL server's
/// postmaster and its children) to `cpus`. What they start later inherits the set.
pub(crate) fn pin_tree(pid: u32, cpus: &[usize]) {
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) {
                pin(tid, cpus);
            }
        }
    }
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return;
    };
    for process in processes.flatten() {
        let Some(child) = process
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // `pid (comm) state ppid …`: the parent is the second field after the command.
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent == Some(pid) {
            pin_tree(child, cpus);
        }
    }
}

/// Pins every thread of this process (the load: the writers, the latency probes) to `cpus`.
pub(crate) fn pin_this_process(cpus: &[usize]) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for task in tasks.flatten() {
        if let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) {
            pin(tid, cpus);
        }
    }
}
