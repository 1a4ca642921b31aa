package vmm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	pathrs "github.com/cyphar/filepath-securejoin/pathrs-lite"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/nsutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
)

// A pod's share is a host directory the hypervisor exports to the guest.
// The hypervisor runs in a mount namespace of its own (a private copy of
// the node's, made as it starts), and what the guest must see of the host,
// each container's rootfs and bind sources, is mounted in that namespace,
// not the node's: the node's mount table holds none of it (so an unmount
// or rmdir of a bind source on the node is not refused because of our
// copies, as with a runc container, whose copies are in the container's
// namespace), and it all goes with the VM. A mount is cloned on the node
// (open_tree), made read-only there as asked (mount_setattr), and attached
// in the VM's namespace (move_mount) beneath the share, never through a
// symlink: the guest can write in the share.
//
// The guest can write anything in the share, symlinks included, at any
// time, and the daemon works there as root: every path of it the daemon
// makes, writes or unmounts is resolved beneath the share's root, never
// through a symlink (openat2 RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS, or
// securejoin's scoped resolution for making directories), and nothing of
// ours is ever mounted there on the node: a rootfs is mounted in the pod's
// stage directory, which the guest does not see, to be cloned.

// beneath is how every path in the share is resolved: a symlink anywhere,
// the last component too, is an error (ELOOP).
var beneath = unix.OpenHow{
	Flags:   unix.O_PATH | unix.O_CLOEXEC,
	Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
}

// openShare opens the share's root (ours: the guest sees inside it only).
func openShare(share string) (*os.File, error) {
	fd, err := unix.Open(share, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("opening the pod's share: %w", err)
	}
	return os.NewFile(uintptr(fd), share), nil
}

// makeInShare makes rel beneath the share, its parents as directories
// (0700) and rel itself as a directory (dir) or an empty file, unless
// there; a symlink anywhere on the way is an error.
func makeInShare(share, rel string, dir bool) error {
	root, err := openShare(share)
	if err != nil {
		return err
	}
	defer root.Close()
	parent, err := pathrs.MkdirAllHandle(root, filepath.Dir(rel), 0o700)
	if err != nil {
		return fmt.Errorf("making the share's %s: %w", filepath.Dir(rel), err)
	}
	defer parent.Close()
	base := filepath.Base(rel)
	if dir {
		err = unix.Mkdirat(int(parent.Fd()), base, 0o755)
	} else {
		var fd int
		fd, err = unix.Openat(int(parent.Fd()), base, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o644)
		if err == nil {
			unix.Close(fd)
		}
	}
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("making the share's %s: %w", rel, err)
	}
	fd, err := unix.Openat2(int(root.Fd()), rel, &beneath)
	if err != nil {
		return fmt.Errorf("the share's %s: %w", rel, err)
	}
	unix.Close(fd)
	return nil
}

// writeInShare writes data to the file rel of the share, atomically (a
// new file renamed over it), in a directory reached without a symlink.
func writeInShare(share, rel string, data []byte, mode uint32) (retErr error) {
	root, err := openShare(share)
	if err != nil {
		return err
	}
	defer root.Close()
	how := beneath
	how.Flags = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_CLOEXEC
	dfd, err := unix.Openat2(int(root.Fd()), filepath.Dir(rel), &how)
	if err != nil {
		return fmt.Errorf("the share's %s: %w", filepath.Dir(rel), err)
	}
	defer unix.Close(dfd)
	base := filepath.Base(rel)
	tmp := "." + base + ".tmp"
	_ = unix.Unlinkat(dfd, tmp, 0)
	fd, err := unix.Openat(dfd, tmp, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, mode)
	if err != nil {
		return fmt.Errorf("writing the share's %s: %w", rel, err)
	}
	f := os.NewFile(uintptr(fd), tmp)
	defer func() {
		if retErr != nil {
			_ = unix.Unlinkat(dfd, tmp, 0)
		}
	}()
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("writing the share's %s: %w", rel, err)
	}
	if err := unix.Renameat(dfd, tmp, dfd, base); err != nil {
		return fmt.Errorf("writing the share's %s: %w", rel, err)
	}
	return nil
}

// hostBind is a bind mount of the host made in a container's share
// directory for the guest to see.
type hostBind struct {
	Source string // on the host
	Target string // relative to the container's share directory
	// ReadOnly makes the bind's top mount read-only; Recursive its
	// submounts too.
	ReadOnly, Recursive bool
}

// shareMount is a detached mount tree to attach at a path of the share.
type shareMount struct {
	tree   *os.File
	target string // relative to the share
	// remountRO, remountRestrict: the kernel cannot change a detached
	// tree's flags (mount_setattr, Linux 5.12): the top mount is made
	// read-only, or nodev,nosuid,noexec, once attached.
	remountRO, remountRestrict bool
}

// cloneTree clones the mount tree at src (with its submounts) detached, and
// makes it read-only as b asks, and without devices, set-uid or exec.
func cloneTree(src string, b hostBind, target string) (shareMount, error) {
	fd, err := unix.OpenTree(unix.AT_FDCWD, src, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_RECURSIVE)
	if err != nil {
		return shareMount{}, fmt.Errorf("cloning the mounts at %s: %w", src, err)
	}
	m := shareMount{tree: os.NewFile(uintptr(fd), src), target: target}
	// The hypervisor serves these files; it never opens a device, runs a
	// program or honours a set-uid bit of them (a guest that made a
	// device node in its rootfs cannot open the node's disk through it).
	err = unix.MountSetattr(fd, "", unix.AT_EMPTY_PATH|unix.AT_RECURSIVE, &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_NODEV | unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NOEXEC})
	switch {
	case err == nil:
	case errors.Is(err, unix.ENOSYS):
		m.remountRestrict = true // submounts keep their flags
	default:
		m.tree.Close()
		return shareMount{}, fmt.Errorf("restricting the mounts at %s: %w", src, err)
	}
	if !b.ReadOnly {
		return m, nil
	}
	flags := unix.AT_EMPTY_PATH
	if b.Recursive {
		flags |= unix.AT_RECURSIVE
	}
	err = unix.MountSetattr(fd, "", uint(flags), &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY})
	switch {
	case err == nil:
	case errors.Is(err, unix.ENOSYS) && !b.Recursive:
		m.remountRO = true
	default:
		m.tree.Close()
		return shareMount{}, fmt.Errorf("making the mounts at %s read-only (recursively: %v): %w", src, b.Recursive, err)
	}
	return m, nil
}

func closeTrees(ms []shareMount) {
	for _, m := range ms {
		m.tree.Close()
	}
}

// vmMountNS runs fn on a thread in the VM's mount namespace, with its
// working directory the node's /proc: fn names the thread's own files
// relative to it (procSelf), since the /proc a jailed VM's namespace
// mounts shows the VM's PID namespace only, where the thread has no
// entry.
func (p *pod) vmMountNS(fn func() error) error {
	p.mu.Lock()
	vm := p.st.VM
	p.mu.Unlock()
	if vm == nil || vm.Pid == 0 {
		return errVMGone
	}
	f, err := os.Open(nsutil.ProcPath(vm.Pid, string(nsutil.Mnt)))
	if err != nil {
		return fmt.Errorf("the VM's mount namespace: %w", errVMGone)
	}
	defer f.Close()
	// Opened first, checked after: a pid reused meanwhile cannot hand
	// over another process's namespace.
	if st, err := proc.ReadStat(vm.Pid); err != nil || st.StartTime != vm.StartTime {
		return errVMGone
	}
	nodeProc, err := os.OpenFile("/proc", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer nodeProc.Close()
	// Do gives a mount namespace's thread file system attributes of its
	// own: its working directory is its own to change.
	return nsutil.Do(map[nsutil.Kind]string{nsutil.Mnt: "/proc/self/fd/" + strconv.Itoa(int(f.Fd()))}, func() error {
		if err := unix.Fchdir(int(nodeProc.Fd())); err != nil {
			return fmt.Errorf("the node's /proc: %w", err)
		}
		return fn()
	})
}

// procSelf names the calling thread's file rel of /proc relative to the
// working directory vmMountNS sets (the node's /proc).
func procSelf(rel string) string { return "thread-self/" + rel }

// attach attaches ms beneath the share, in the VM's mount namespace; on
// error none of them stays attached.
func (p *pod) attach(ms []shareMount) error {
	share := p.shareDir()
	return p.vmMountNS(func() (retErr error) {
		root, err := openShare(share)
		if err != nil {
			return err
		}
		defer root.Close()
		var done []string
		defer func() {
			if retErr != nil {
				for _, t := range slices.Backward(done) {
					_ = unmountBeneath(root, t)
				}
			}
		}()
		for _, m := range ms {
			how := beneath
			how.Resolve |= unix.RESOLVE_NO_XDEV
			target, err := unix.Openat2(int(root.Fd()), m.target, &how)
			if err != nil {
				return fmt.Errorf("the share's %s: %w", m.target, err)
			}
			err = unix.MoveMount(int(m.tree.Fd()), "", target, "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH)
			unix.Close(target)
			if err != nil {
				return fmt.Errorf("attaching %s at the share's %s: %w", m.tree.Name(), m.target, err)
			}
			done = append(done, m.target)
			if m.remountRO || m.remountRestrict {
				// Through the moved tree: the mount attached, whatever the
				// guest renames meanwhile.
				if err := remount(int(m.tree.Fd()), m.target, m.remountRO); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

// remount makes the mount fd is (an attached tree, at the share's rel)
// nodev, nosuid, noexec and read-only if asked (kernels without
// mount_setattr: its submounts keep their flags). It runs in vmMountNS.
func remount(fd int, rel string, readOnly bool) error {
	flags := uintptr(unix.MS_REMOUNT | unix.MS_BIND | unix.MS_NODEV | unix.MS_NOSUID | unix.MS_NOEXEC)
	// A remount sets the flags it is given: a mount read-only already
	// stays so.
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return fmt.Errorf("the share's %s: %w", rel, err)
	}
	if readOnly || st.Flags&unix.ST_RDONLY != 0 {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount("", fdPath(fd), "", flags, ""); err != nil {
		return fmt.Errorf("restricting the share's %s (read-only: %v): %w", rel, readOnly, err)
	}
	return nil
}

// fdPath names an open file through the calling thread's fd table (in
// vmMountNS).
func fdPath(fd int) string { return procSelf("fd/" + strconv.Itoa(fd)) }

// detach unmounts everything at and beneath the share's rel in the VM's
// mount namespace. A VM that is gone took its mounts with it.
func (p *pod) detach(rel string) error {
	share := p.shareDir()
	err := p.vmMountNS(func() error {
		root, err := openShare(share)
		if err != nil {
			return err
		}
		defer root.Close()
		return unmountBeneath(root, rel)
	})
	if errors.Is(err, errVMGone) {
		return nil
	}
	return err
}

// unmountBeneath unmounts, deepest first, the mounts at and beneath the
// share's rel in the calling thread's mount namespace (its mountinfo, not
// the process's). Each is reached from the share's root without a symlink
// and unmounted through its file descriptor, so a guest that swaps a
// directory for a symlink meanwhile cannot point the unmount elsewhere; a
// mount the guest moved out of rel (renaming a parent) stays, and goes
// with the VM.
func unmountBeneath(root *os.File, rel string) error {
	f, err := os.Open(procSelf("mountinfo"))
	if err != nil {
		return err
	}
	defer f.Close()
	share := root.Name()
	mounts, err := mountinfo.GetMountsFromReader(f, mountinfo.PrefixFilter(filepath.Join(share, rel)))
	if err != nil {
		return fmt.Errorf("reading mountinfo: %w", err)
	}
	slices.SortFunc(mounts, func(a, b *mountinfo.Info) int {
		return strings.Count(b.Mountpoint, "/") - strings.Count(a.Mountpoint, "/")
	})
	var errs []error
	for _, m := range mounts {
		mrel, err := filepath.Rel(share, m.Mountpoint)
		if err != nil || mrel == "." || strings.HasPrefix(mrel, "..") {
			continue
		}
		fd, err := unix.Openat2(int(root.Fd()), mrel, &beneath)
		if err != nil {
			errs = append(errs, fmt.Errorf("the share's %s: %w", mrel, err))
			continue
		}
		err = unix.Unmount(fdPath(fd), unix.MNT_DETACH)
		unix.Close(fd)
		if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmounting the share's %s: %w", mrel, err))
		}
	}
	return errors.Join(errs...)
}
