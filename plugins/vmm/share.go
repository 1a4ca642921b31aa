package vmm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

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
	// remountRO: the kernel cannot make a detached tree read-only
	// (mount_setattr, Linux 5.12): the top mount is once attached.
	remountRO bool
}

// cloneTree clones the mount tree at src (with its submounts) detached, and
// makes it read-only as b asks.
func cloneTree(src string, b hostBind, target string) (shareMount, error) {
	fd, err := unix.OpenTree(unix.AT_FDCWD, src, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_RECURSIVE)
	if err != nil {
		return shareMount{}, fmt.Errorf("cloning the mounts at %s: %w", src, err)
	}
	m := shareMount{tree: os.NewFile(uintptr(fd), src), target: target}
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

// vmMountNS runs fn on a thread in the VM's mount namespace.
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
	return nsutil.Do(map[nsutil.Kind]string{nsutil.Mnt: "/proc/self/fd/" + strconv.Itoa(int(f.Fd()))}, fn)
}

// attach attaches ms beneath the share, in the VM's mount namespace; on
// error none of them stays attached.
func (p *pod) attach(ms []shareMount) error {
	share := p.shareDir()
	return p.vmMountNS(func() (retErr error) {
		root, err := unix.Open(share, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
		if err != nil {
			return fmt.Errorf("opening the share in the VM's mount namespace: %w", err)
		}
		defer unix.Close(root)
		var done []string
		defer func() {
			if retErr != nil {
				for _, t := range slices.Backward(done) {
					_ = unmountBeneath(filepath.Join(share, t))
				}
			}
		}()
		for _, m := range ms {
			target, err := unix.Openat2(root, m.target, &unix.OpenHow{
				Flags:   unix.O_PATH | unix.O_CLOEXEC | unix.O_NOFOLLOW,
				Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV,
			})
			if err != nil {
				return fmt.Errorf("the share's %s: %w", m.target, err)
			}
			err = unix.MoveMount(int(m.tree.Fd()), "", target, "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH)
			unix.Close(target)
			if err != nil {
				return fmt.Errorf("attaching %s at the share's %s: %w", m.tree.Name(), m.target, err)
			}
			done = append(done, m.target)
			if m.remountRO {
				if err := unix.Mount("", filepath.Join(share, m.target), "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
					return fmt.Errorf("making the share's %s read-only: %w", m.target, err)
				}
			}
		}
		return nil
	})
}

// detach unmounts everything at and beneath the share's rel in the VM's
// mount namespace. A VM that is gone took its mounts with it.
func (p *pod) detach(rel string) error {
	err := p.vmMountNS(func() error { return unmountBeneath(filepath.Join(p.shareDir(), rel)) })
	if errors.Is(err, errVMGone) {
		return nil
	}
	return err
}

// unmountBeneath unmounts, deepest first, the mounts at and beneath dir in
// the calling thread's mount namespace (its mountinfo, not the process's).
func unmountBeneath(dir string) error {
	f, err := os.Open("/proc/thread-self/mountinfo")
	if err != nil {
		return err
	}
	defer f.Close()
	mounts, err := mountinfo.GetMountsFromReader(f, mountinfo.PrefixFilter(dir))
	if err != nil {
		return fmt.Errorf("reading mountinfo: %w", err)
	}
	slices.SortFunc(mounts, func(a, b *mountinfo.Info) int {
		return strings.Count(b.Mountpoint, "/") - strings.Count(a.Mountpoint, "/")
	})
	var errs []error
	for _, m := range mounts {
		if err := unix.Unmount(m.Mountpoint, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmounting %s: %w", m.Mountpoint, err))
		}
	}
	return errors.Join(errs...)
}
