// Package jail confines a hypervisor process of kuasar-vmm before it
// runs: the process keeper spawns a small helper (kuasar-keeper's "jail"
// mode) in a mount namespace of its own, which builds a root holding only
// what the hypervisor needs, pivots into it, takes away every capability
// the hypervisor does not use and the right to gain new ones, and execs
// the hypervisor in place (same pid, so the keeper's process reference
// stays valid).
//
// A hypervisor runs the guest's devices: a bug in one is the guest's way
// onto the node. Jailed, a QEMU that a guest took over is still root for
// the files of its own pod (the 9p server must chown and read anything
// the guest's containers own), but it sees no other file of the node: not
// other pods' root file systems, volumes or secrets, not the daemon's
// state, not /etc; the binaries and libraries it runs from are read-only;
// device nodes in the share cannot be opened; and without CAP_SYS_ADMIN,
// CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_MODULE and the like it can
// neither remount, reach the node's privileged processes nor load code
// into the kernel.
//
// Every path is bound at the same absolute path it has on the node, so
// the hypervisor's command line, its sockets and the daemon's later mounts
// beneath the share (made from inside the namespace) need no translation.
package jail

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/moby/sys/capability"
	"golang.org/x/sys/unix"
)

// Arg is the helper's first argument, the mode of kuasar-keeper that runs
// Main.
const Arg = "jail"

// Spec is what a jailed process may see and keep. Paths are absolute
// paths of the node; each appears at the same path in the jail.
type Spec struct {
	// Root is a directory of the node where the jail's root (a small
	// tmpfs, read-only once built) is mounted, in the process's own mount
	// namespace only. It may be inside a Writable directory (the VM's run
	// directory): those are bound without their submounts, so the jail
	// does not hold its own root.
	Root string `json:"root"`
	// ReadOnly are files and directories the process reads (binaries,
	// libraries, firmware, the guest's kernel), bound read-only, without
	// devices or set-uid.
	ReadOnly []string `json:"readOnly,omitempty"`
	// Writable are files and directories it writes (its run directory,
	// the guest's share, a RAM file), bound read-write (unless the node's
	// mount there is read-only) without their submounts, devices, set-uid
	// or executables. Each must exist.
	Writable []string `json:"writable,omitempty"`
	// Devices are device nodes it opens (/dev/kvm, /dev/vhost-vsock),
	// bound read-only: opened as they are, never chmod-ed or chown-ed.
	Devices []string `json:"devices,omitempty"`
	// Capabilities are the only ones it keeps (names as "CAP_CHOWN"); its
	// bounding set is reduced to them, and it cannot gain others (no new
	// privileges).
	Capabilities []string `json:"capabilities,omitempty"`
}

// BaseDevices are the device nodes every jail has.
var BaseDevices = []string{"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}

// Command returns the helper's command line that jails spec and then runs
// path with args (args without path): helper is kuasar-keeper's binary.
func Command(helper string, spec Spec, path string, args []string) (string, []string, error) {
	if err := spec.validate(); err != nil {
		return "", nil, err
	}
	b, err := json.Marshal(spec)
	if err != nil {
		return "", nil, err
	}
	argv := append([]string{helper, Arg, string(b), "--", path}, args...)
	return helper, argv, nil
}

func (s Spec) validate() error {
	if !filepath.IsAbs(s.Root) || filepath.Clean(s.Root) == "/" {
		return fmt.Errorf("jail root %q: want an absolute directory other than /", s.Root)
	}
	for _, list := range [][]string{s.ReadOnly, s.Writable, s.Devices} {
		for _, p := range list {
			if !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" {
				return fmt.Errorf("jail path %q: want a clean absolute path other than /", p)
			}
		}
	}
	if _, err := capMask(s.Capabilities); err != nil {
		return err
	}
	return nil
}

// Main is the helper: args are what Command put after Arg. It jails the
// process and execs the command; it returns only on failure (exit code).
func Main(args []string) int {
	if err := run(args); err != nil {
		fmt.Fprintln(os.Stderr, "kuasar-keeper jail:", err)
		return 126
	}
	return 0
}

func run(args []string) error {
	if len(args) < 3 || args[1] != "--" {
		return errors.New("usage: jail SPEC -- COMMAND [ARG...]")
	}
	var spec Spec
	if err := json.Unmarshal([]byte(args[0]), &spec); err != nil {
		return fmt.Errorf("reading the spec: %w", err)
	}
	if err := spec.validate(); err != nil {
		return err
	}
	// Capabilities and no_new_privs belong to a thread: the one that
	// sets them must be the one that execs.
	runtime.LockOSThread()
	if err := Enter(spec); err != nil {
		return err
	}
	argv := args[2:]
	if err := unix.Exec(argv[0], argv, os.Environ()); err != nil {
		return fmt.Errorf("exec %s: %w", argv[0], err)
	}
	return nil
}

// Enter jails the calling process and thread (locked to its OS thread,
// in a mount namespace of its own: Enter refuses to pivot the node's).
func Enter(spec Spec) error {
	if err := ownMountNamespace(); err != nil {
		return err
	}
	keep, err := capMask(spec.Capabilities)
	if err != nil {
		return err
	}
	// Read while the node's /proc is there (the jail's has no sys/).
	last, err := capability.LastCap()
	if err != nil {
		return err
	}
	caps, err := capability.NewPid2(0)
	if err == nil {
		err = caps.Load()
	}
	if err != nil {
		return fmt.Errorf("reading capabilities: %w", err)
	}
	cwd, err := os.Getwd()
	if err != nil {
		cwd = "/"
	}
	if err := build(spec); err != nil {
		return err
	}
	if err := pivot(spec.Root); err != nil {
		return err
	}
	if err := unix.Chdir(cwd); err != nil {
		_ = unix.Chdir("/")
	}
	return confine(caps, keep, last)
}

// ownMountNamespace checks that the process does not share its parent's
// mount namespace (the keeper's, the node's).
func ownMountNamespace() error {
	var self, parent unix.Stat_t
	if err := unix.Stat("/proc/self/ns/mnt", &self); err != nil {
		return fmt.Errorf("reading the mount namespace: %w", err)
	}
	// The parent as the node's /proc knows it: in a PID namespace of its
	// own, getppid says 0.
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return fmt.Errorf("reading the parent: %w", err)
	}
	fields := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(fields) < 2 {
		return errors.New("reading the parent: malformed /proc/self/stat")
	}
	if err := unix.Stat("/proc/"+fields[1]+"/ns/mnt", &parent); err != nil {
		return fmt.Errorf("reading the parent's mount namespace: %w", err)
	}
	if self.Ino == parent.Ino && self.Dev == parent.Dev {
		return errors.New("not in a mount namespace of its own (spawn it with CLONE_NEWNS)")
	}
	return nil
}

// build mounts the jail's root and binds into it what spec lists.
func build(spec Spec) error {
	// Nothing of what follows may reach the node's mounts.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making the mounts private: %w", err)
	}
	root := spec.Root
	if err := os.MkdirAll(root, 0o700); err != nil {
		return err
	}
	if err := unix.Mount("tmpfs", root, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755,size=1m,nr_inodes=4096"); err != nil {
		return fmt.Errorf("mounting the jail's root at %s: %w", root, err)
	}
	j := &jailRoot{root: root}
	// The dynamic loader and the libraries: merged-/usr systems have
	// /lib, /lib64, /bin as symlinks into /usr.
	for _, p := range spec.ReadOnly {
		if err := j.bind(p, unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, true); err != nil {
			return err
		}
	}
	for _, p := range spec.Writable {
		if err := j.bind(p, unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, false); err != nil {
			return err
		}
	}
	devices := append(append([]string(nil), BaseDevices...), spec.Devices...)
	for _, p := range devices {
		if err := j.bind(p, unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NOEXEC, false); err != nil {
			return err
		}
	}
	if err := mountProc(filepath.Join(root, "proc")); err != nil {
		return err
	}
	for _, d := range []string{"tmp", "dev/shm"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return err
		}
	}
	return nil
}

// mountProc mounts a /proc for the process's own entries (QEMU reads
// /proc/self). Spawned in a PID namespace of its own (as kuasar-vmm does),
// it shows that namespace only; in any case only the processes it could
// trace, and, where the kernel can (5.8), nothing but processes: no
// /proc/sys, whose files root may write without any capability
// (core_pattern would run a program of its choosing on the node), no
// sysrq-trigger. Older kernels get those read-only or masked, as runc
// does for a container.
func mountProc(proc string) error {
	if err := os.Mkdir(proc, 0o555); err != nil {
		return err
	}
	flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
	if err := unix.Mount("proc", proc, "proc", flags, "hidepid=ptraceable,subset=pid"); err == nil {
		return nil
	}
	if err := unix.Mount("proc", proc, "proc", flags, ""); err != nil {
		return fmt.Errorf("mounting /proc in the jail: %w", err)
	}
	for _, rel := range []string{"bus", "fs", "irq", "sys", "sysrq-trigger"} {
		p := filepath.Join(proc, rel)
		if _, err := os.Lstat(p); err != nil {
			continue
		}
		if err := unix.Mount(p, p, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("jail: /proc/%s: %w", rel, err)
		}
		if err := unix.Mount("", p, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY|flags, ""); err != nil {
			return fmt.Errorf("jail: making /proc/%s read-only: %w", rel, err)
		}
	}
	for _, rel := range []string{"kcore", "keys", "latency_stats", "timer_list", "timer_stats", "sched_debug", "acpi", "scsi", "asound", "interrupts", "kallsyms"} {
		p := filepath.Join(proc, rel)
		fi, err := os.Lstat(p)
		if err != nil {
			continue
		}
		if fi.IsDir() {
			err = unix.Mount("tmpfs", p, "tmpfs", unix.MS_RDONLY|flags, "size=0")
		} else if err = unix.Mount("/dev/null", p, "", unix.MS_BIND, ""); err == nil {
			// Read-only: a writable bind of the node's /dev/null
			// could be chmod-ed.
			err = unix.Mount("", p, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NOEXEC, "")
		}
		if err != nil {
			return fmt.Errorf("jail: masking /proc/%s: %w", rel, err)
		}
	}
	return nil
}

// jailRoot makes paths of the node appear in the jail.
type jailRoot struct{ root string }

// bind binds the node's path p at the same path in the jail, with flags
// (MS_RDONLY, MS_NOSUID...), with its submounts if recursive.
func (j *jailRoot) bind(p string, flags uintptr, recursive bool) error {
	real, err := j.mirror(p, 0)
	if err != nil {
		return err
	}
	fi, err := os.Stat(real)
	if err != nil {
		return fmt.Errorf("jail: %w", err)
	}
	target := filepath.Join(j.root, real)
	if err := mountPoint(target, fi.IsDir()); err != nil {
		return fmt.Errorf("jail: the mount point of %s: %w", real, err)
	}
	bflags := uintptr(unix.MS_BIND)
	if recursive {
		bflags |= unix.MS_REC
	}
	if err := unix.Mount(real, target, "", bflags, ""); err != nil {
		return fmt.Errorf("jail: binding %s: %w", real, err)
	}
	// The flags of a bind apply on a remount; submounts keep theirs,
	// so they are set recursively where the kernel can.
	attr := &unix.MountAttr{}
	for _, f := range []struct {
		flag uintptr
		attr uint64
	}{{unix.MS_RDONLY, unix.MOUNT_ATTR_RDONLY}, {unix.MS_NOSUID, unix.MOUNT_ATTR_NOSUID}, {unix.MS_NODEV, unix.MOUNT_ATTR_NODEV}, {unix.MS_NOEXEC, unix.MOUNT_ATTR_NOEXEC}} {
		if flags&f.flag != 0 {
			attr.Attr_set |= f.attr
		}
	}
	err = unix.MountSetattr(unix.AT_FDCWD, target, unix.AT_RECURSIVE, attr)
	if errors.Is(err, unix.ENOSYS) {
		err = unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|flags, "")
	}
	if err != nil {
		return fmt.Errorf("jail: restricting %s: %w", real, err)
	}
	return nil
}

// mirror makes, in the jail, the directories and symlinks on the way to
// the node's p (a symlink as it is on the node: its target resolves in
// the jail as it does on the node, since both have the same paths), and
// returns p with every symlink resolved: the node's real file.
func (j *jailRoot) mirror(p string, depth int) (string, error) {
	if depth > 40 {
		return "", fmt.Errorf("jail: %s: too many symlinks", p)
	}
	parts := strings.Split(strings.TrimPrefix(filepath.Clean(p), "/"), "/")
	cur := "/"
	for i, part := range parts {
		next := filepath.Join(cur, part)
		fi, err := os.Lstat(next)
		if err != nil {
			return "", fmt.Errorf("jail: %w", err)
		}
		if fi.Mode()&os.ModeSymlink == 0 {
			if fi.IsDir() && i < len(parts)-1 {
				if err := os.MkdirAll(filepath.Join(j.root, next), 0o755); err != nil {
					return "", err
				}
			}
			cur = next
			continue
		}
		target, err := os.Readlink(next)
		if err != nil {
			return "", err
		}
		if err := os.Symlink(target, filepath.Join(j.root, next)); err != nil && !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("jail: the symlink %s: %w", next, err)
		}
		if !filepath.IsAbs(target) {
			target = filepath.Join(cur, target)
		}
		resolved, err := j.mirror(target, depth+1)
		if err != nil {
			return "", err
		}
		cur = resolved
	}
	return cur, nil
}

// mountPoint makes target (a directory, or an empty file) unless there:
// it may be beneath an earlier read-only bind (a kernel under /usr).
func mountPoint(target string, dir bool) error {
	if _, err := os.Lstat(target); err == nil {
		return nil
	}
	if dir {
		return os.MkdirAll(target, 0o755)
	}
	if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	return f.Close()
}

// pivot makes root the process's root and lets go of the node's.
func pivot(root string) error {
	if err := unix.Chdir(root); err != nil {
		return err
	}
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root into the jail: %w", err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detaching the node's root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	// The jail's own directories are fixed from now on.
	if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return fmt.Errorf("making the jail's root read-only: %w", err)
	}
	return nil
}

// confine reduces the calling thread's bounding set to keep and forbids
// it new privileges: what it execs as root gets keep and nothing else.
func confine(caps capability.Capabilities, keep uint64, last capability.Cap) error {
	var drop []capability.Cap
	for c := capability.Cap(0); c <= last; c++ {
		if keep&(1<<uint(c)) == 0 {
			drop = append(drop, c)
		}
	}
	if err := capability.DropBound(drop...); err != nil {
		return fmt.Errorf("dropping capabilities: %w", err)
	}
	// Root's exec gets its bounding set and its inheritable one: the
	// latter goes (and the ambient set with it).
	caps.Clear(capability.INHERITABLE | capability.AMBIENT)
	if err := caps.Apply(capability.CAPS | capability.AMBIENT); err != nil {
		return fmt.Errorf("clearing inheritable capabilities: %w", err)
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("setting no_new_privs: %w", err)
	}
	return nil
}

// capMask turns capability names into a bit mask; an unknown name is an
// error (a typo must not silently keep less, or more).
func capMask(names []string) (uint64, error) {
	known := map[string]capability.Cap{}
	for _, c := range capability.ListKnown() {
		known["CAP_"+strings.ToUpper(c.String())] = c
	}
	var m uint64
	for _, n := range names {
		c, ok := known[strings.ToUpper(n)]
		if !ok {
			return 0, fmt.Errorf("jail: unknown capability %q", n)
		}
		m |= 1 << uint(c)
	}
	return m, nil
}
