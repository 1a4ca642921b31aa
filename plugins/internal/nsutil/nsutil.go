// Package nsutil creates and holds Linux namespaces without a process: a
// locked OS thread unshares them, and their /proc files are bind-mounted
// onto files that keep them alive. It also runs code inside namespaces
// (for pod sysctls). Sandboxes use it in place of a pause container.
package nsutil

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
)

// Kind names a namespace type as in /proc/PID/ns.
type Kind string

// Namespace kinds handled here.
const (
	IPC Kind = "ipc"
	UTS Kind = "uts"
	Net Kind = "net"
	PID Kind = "pid"
	Mnt Kind = "mnt"
)

// cloneFlag are the unshare(2) flags of the kinds Create can make.
var cloneFlag = map[Kind]int{IPC: unix.CLONE_NEWIPC, UTS: unix.CLONE_NEWUTS, Net: unix.CLONE_NEWNET}

// setnsFlag are the setns(2) flags of the kinds Do can join.
var setnsFlag = map[Kind]int{IPC: unix.CLONE_NEWIPC, UTS: unix.CLONE_NEWUTS, Net: unix.CLONE_NEWNET, Mnt: unix.CLONE_NEWNS}

// Create makes new namespaces of the given kinds, sets hostname in a new
// UTS namespace, and pins each at dir/<kind>. It returns the pinned paths.
// On error nothing is left mounted.
func Create(dir string, kinds []Kind, hostname string) (map[Kind]string, error) {
	if len(kinds) == 0 {
		return map[Kind]string{}, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	flags := 0
	for _, k := range kinds {
		f, ok := cloneFlag[k]
		if !ok {
			return nil, fmt.Errorf("unsupported namespace %q", k)
		}
		flags |= f
	}
	var paths map[Kind]string
	err := onThread(kinds, false, func() (err error) {
		paths, err = unshareAndPin(dir, kinds, flags, hostname)
		return err
	})
	return paths, err
}

// onThread runs fn on a new goroutine locked to its OS thread, for fn to
// change that thread's namespaces of the given kinds. The thread is put
// back into the namespaces it had before and handed back to the scheduler;
// if that fails, or if fn was allowed to unshare the thread's file system
// attributes (unshareFS), the goroutine ends locked and the runtime
// discards the thread. Restoring matters even then: the runtime cannot end
// the main thread and parks it instead, and /proc/self (the main thread's
// view) must keep showing the node's namespaces to the whole process.
func onThread(kinds []Kind, unshareFS bool, fn func() error) error {
	ch := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		tid := unix.Gettid()
		saved := map[Kind]int{}
		err := func() error {
			for _, k := range kinds {
				fd, err := unix.Open(fmt.Sprintf("/proc/self/task/%d/ns/%s", tid, k), unix.O_RDONLY|unix.O_CLOEXEC, 0)
				if err != nil {
					return fmt.Errorf("opening this thread's %s namespace: %w", k, err)
				}
				saved[k] = fd
			}
			if unshareFS {
				if err := unix.Unshare(unix.CLONE_FS); err != nil {
					return fmt.Errorf("unshare CLONE_FS: %w", err)
				}
			}
			return fn()
		}()
		// Back in its own namespaces before the caller goes on: the
		// caller may look at this thread (or the process) at once.
		restored := true
		for k, fd := range saved {
			if err := unix.Setns(fd, setnsFlag[k]); err != nil {
				restored = false
			}
			unix.Close(fd)
		}
		if restored && !unshareFS {
			runtime.UnlockOSThread()
		}
		ch <- err
	}()
	return <-ch
}

func unshareAndPin(dir string, kinds []Kind, flags int, hostname string) (_ map[Kind]string, retErr error) {
	if err := unix.Unshare(flags); err != nil {
		return nil, fmt.Errorf("unshare: %w", err)
	}
	if hostname != "" && flags&unix.CLONE_NEWUTS != 0 {
		if err := unix.Sethostname([]byte(hostname)); err != nil {
			return nil, fmt.Errorf("sethostname %q: %w", hostname, err)
		}
	}
	tid := unix.Gettid()
	paths := map[Kind]string{}
	defer func() {
		if retErr != nil {
			for _, p := range paths {
				Release(p)
			}
		}
	}()
	for _, k := range kinds {
		target := filepath.Join(dir, string(k))
		if err := Pin(fmt.Sprintf("/proc/self/task/%d/ns/%s", tid, k), target); err != nil {
			return nil, err
		}
		paths[k] = target
	}
	return paths, nil
}

// Pin bind-mounts the namespace file src onto target (created if needed).
func Pin(src, target string) error {
	f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o400)
	if err != nil {
		return fmt.Errorf("creating namespace pin: %w", err)
	}
	f.Close()
	if err := unix.Mount(src, target, "", unix.MS_BIND, ""); err != nil {
		os.Remove(target)
		return fmt.Errorf("pinning %s at %s: %w", src, target, err)
	}
	return nil
}

// PinOf pins the namespace of kind k of the process pid, if it is still
// the process that started at start (clock ticks since boot), at target:
// the namespace is opened first and the process checked after, so that a
// pid reused meanwhile cannot hand over someone else's namespace.
func PinOf(pid int, start uint64, k Kind, target string) error {
	f, err := os.Open(ProcPath(pid, string(k)))
	if err != nil {
		return fmt.Errorf("opening the %s namespace of %d: %w", k, pid, err)
	}
	defer f.Close()
	if st, err := proc.ReadStat(pid); err != nil || st.StartTime != start {
		return fmt.Errorf("process %d is gone: %w", pid, unix.ESRCH)
	}
	return Pin(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), target)
}

// Release unmounts a pinned namespace file and removes it. A missing or
// unmounted file is not an error.
func Release(path string) error {
	err := unix.Unmount(path, unix.MNT_DETACH)
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmounting %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// IsPinned reports whether path is a mounted namespace file.
func IsPinned(path string) bool {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false
	}
	return st.Type == unix.NSFS_MAGIC
}

// Do runs fn on a thread that has joined the namespaces at paths (kinds to
// namespace file paths); the thread goes back to its own namespaces after.
// Joining a mount namespace gives the thread its own root and working
// directory first (unshare CLONE_FS: the process's other threads share
// theirs), and that thread is then discarded. fn must not hand work that
// expects the namespaces to other goroutines.
func Do(paths map[Kind]string, fn func() error) error {
	kinds := make([]Kind, 0, len(paths))
	for k := range paths {
		if _, ok := setnsFlag[k]; !ok {
			return fmt.Errorf("joining a %s namespace is not supported", k)
		}
		kinds = append(kinds, k)
	}
	_, mnt := paths[Mnt]
	return onThread(kinds, mnt, func() error {
		for _, k := range kinds {
			fd, err := unix.Open(paths[k], unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("opening %s namespace %s: %w", k, paths[k], err)
			}
			err = unix.Setns(fd, setnsFlag[k])
			unix.Close(fd)
			if err != nil {
				return fmt.Errorf("joining %s namespace %s: %w", k, paths[k], err)
			}
		}
		return fn()
	})
}

// ProcPath returns /proc/PID/ns/KIND.
func ProcPath(pid int, k string) string {
	return "/proc/" + strconv.Itoa(pid) + "/ns/" + k
}
