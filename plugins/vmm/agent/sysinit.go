package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// mount is one file system PID 1 mounts.
type mount struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
	mode                   os.FileMode
}

// systemMounts are mounted in order at boot. /sys/fs/cgroup is cgroup v2
// only: runc and the kernel both support it fully, and it keeps the
// guest's cgroup tree a single hierarchy.
var systemMounts = []mount{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", 0o555},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "", 0o555},
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755", 0o755},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620", 0o755},
	{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", 0o1777},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755", 0o755},
	{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777", 0o1777},
	{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "nsdelegate", 0o555},
}

// cgroupControllers are enabled for the containers' cgroups, where the
// kernel has them.
var cgroupControllers = []string{"cpu", "cpuset", "io", "memory", "pids", "hugetlb"}

// setupSystem makes the guest's root file system usable: kernel file
// systems, cgroups and the loopback interface. An error is fatal; what is
// only nice to have is logged.
func setupSystem(ctx context.Context) error {
	if err := leaveRootfs(); err != nil {
		return err
	}
	for _, m := range systemMounts {
		if err := os.MkdirAll(m.target, m.mode); err != nil {
			return fmt.Errorf("mkdir %s: %w", m.target, err)
		}
		if err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
		}
	}
	_ = os.Symlink("/proc/self/fd", "/dev/fd")
	_ = os.Symlink("/dev/pts/ptmx", "/dev/ptmx")
	for _, c := range cgroupControllers {
		if err := os.WriteFile("/sys/fs/cgroup/cgroup.subtree_control", []byte("+"+c), 0); err != nil {
			log.G(ctx).WithError(err).Debugf("cgroup controller %s not enabled", c)
		}
	}
	if err := linkUp("lo"); err != nil {
		log.G(ctx).WithError(err).Warn("loopback interface not up")
	}
	return nil
}

// linkUp brings a network interface up.
func linkUp(name string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("%s flags: %w", name, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("%s up: %w", name, err)
	}
	return nil
}

// powerOff ends the guest: the hypervisor process exits.
func powerOff(ctx context.Context, reboot bool) {
	unix.Sync()
	cmd := unix.LINUX_REBOOT_CMD_POWER_OFF
	if reboot {
		cmd = unix.LINUX_REBOOT_CMD_RESTART
	}
	if err := unix.Reboot(cmd); err != nil {
		log.G(ctx).WithError(err).Error("reboot(2) failed")
	}
}

// findPort returns the device of the virtio-serial port named name, as
// listed in sysfs (dir is /sys/class/virtio-ports).
func findPort(dir, name string) (string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), "name"))
		if err != nil {
			continue
		}
		if string(trimNewline(b)) == name {
			return filepath.Join("/dev", e.Name()), nil
		}
	}
	return "", os.ErrNotExist
}

func trimNewline(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == 0) {
		b = b[:len(b)-1]
	}
	return b
}

// leaveRootfs puts the agent on a root that pivot_root(2) accepts. The
// initramfs is the kernel's rootfs, the one mount without a parent, and
// pivot_root refuses to move a process off it (EINVAL), so runc could only
// run containers with --no-pivot (a chroot a process can climb out of with
// the right capabilities). A bind mount of / moved onto / and chrooted
// into, as switch_root does with a new root, is the same files on a mount
// that has a parent: runc pivots from it. Nothing is copied, no memory is
// used.
func leaveRootfs() error {
	const tmp = "/.kuasar-root"
	if err := os.Mkdir(tmp, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("leaving the rootfs: %w", err)
	}
	if err := unix.Mount("/", tmp, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("leaving the rootfs: bind mount of /: %w", err)
	}
	if err := unix.Chdir(tmp); err != nil {
		return fmt.Errorf("leaving the rootfs: %w", err)
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("leaving the rootfs: moving the bind mount onto /: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("leaving the rootfs: chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("leaving the rootfs: %w", err)
	}
	// The directory is no mount point any more: the mount moved.
	_ = os.Remove(tmp)
	return nil
}
