package wasmhost

import (
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"unsafe"

	capability "github.com/containerd/containerd/v2/pkg/cap"
	"github.com/containerd/errdefs"
	securejoin "github.com/cyphar/filepath-securejoin"
	"golang.org/x/sys/unix"
)

// The functions here run on a container's locked OS thread. They change
// that thread only: its file system root and working directory (CLONE_FS),
// its mount namespace and its network namespace. The thread is never
// unlocked: it ends with its goroutine, and with it the namespaces it made.

// isolation is what an init thread made, for exec threads to join.
type isolation struct {
	mntns *os.File // the container's mount namespace; its root is the rootfs
}

func (iso *isolation) close() {
	if iso != nil && iso.mntns != nil {
		iso.mntns.Close()
	}
}

// isolateInit gives the calling thread a mount namespace of its own that
// holds only the container's root file system and mounts (the host's are
// detached from it, so it pins none of them), makes that its root, and
// joins the pod's network namespace.
func isolateInit(req *CreateRequest) (_ *isolation, retErr error) {
	root := req.RootfsDir
	if !filepath.IsAbs(root) {
		return nil, fmt.Errorf("rootfs dir %q is not absolute: %w", root, errdefs.ErrInvalidArgument)
	}
	var netns *os.File
	if req.NetNS != "" {
		var err error
		if netns, err = os.Open(req.NetNS); err != nil {
			return nil, fmt.Errorf("pod network namespace: %w", err)
		}
		defer netns.Close()
	}
	if err := unix.Unshare(unix.CLONE_FS | unix.CLONE_NEWNS); err != nil {
		return nil, fmt.Errorf("unsharing mount namespace: %w", err)
	}
	// Nothing done here may propagate to the host.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return nil, fmt.Errorf("making mounts private: %w", err)
	}
	if len(req.Rootfs) > 0 {
		if err := os.MkdirAll(root, 0o711); err != nil {
			return nil, err
		}
		for _, m := range req.Rootfs {
			if err := mountAt(m, root); err != nil {
				return nil, fmt.Errorf("mounting rootfs: %w", err)
			}
		}
	}
	// The root must be a mount point of its own, to pivot into it and to
	// make it read-only.
	if err := unix.Mount(root, root, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return nil, fmt.Errorf("binding rootfs: %w", err)
	}
	for _, m := range req.Mounts {
		if err := mountInRoot(root, m); err != nil {
			return nil, err
		}
	}
	// No device node or set-user-ID bit of the image has any effect: the
	// module runs on a thread of a root process, outside any device cgroup.
	rootFlags := uintptr(unix.MS_REMOUNT | unix.MS_BIND | unix.MS_NODEV | unix.MS_NOSUID)
	if req.Readonly {
		rootFlags |= unix.MS_RDONLY
	}
	if err := unix.Mount("", root, "", rootFlags, ""); err != nil {
		return nil, fmt.Errorf("remounting rootfs (nodev, nosuid, read-only: %v): %w", req.Readonly, err)
	}
	mntns, err := os.Open("/proc/thread-self/ns/mnt")
	if err != nil {
		return nil, err
	}
	iso := &isolation{mntns: mntns}
	defer func() {
		if retErr != nil {
			iso.close()
		}
	}()
	if err := pivotInto(root); err != nil {
		return nil, err
	}
	if netns != nil {
		if err := unix.Setns(int(netns.Fd()), unix.CLONE_NEWNET); err != nil {
			return nil, fmt.Errorf("joining pod network namespace: %w", err)
		}
	}
	return iso, chdir(req.Process.Cwd)
}

// pivotInto makes root the root of the thread's mount namespace and
// detaches everything else.
func pivotInto(root string) error {
	oldRoot, err := unix.Open("/", unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(oldRoot)
	if err := unix.Chdir(root); err != nil {
		return err
	}
	// With new and old root the same, the old root ends up mounted on top
	// of the new one, where it can be detached.
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root into rootfs: %w", err)
	}
	if err := unix.Fchdir(oldRoot); err != nil {
		return err
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detaching the host's mounts: %w", err)
	}
	return unix.Chdir("/")
}

// isolateExec moves the calling thread into a container made by
// isolateInit.
func isolateExec(iso *isolation, netns, cwd string) error {
	if netns != "" {
		f, err := os.Open(netns)
		if err != nil {
			return fmt.Errorf("pod network namespace: %w", err)
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("joining pod network namespace: %w", err)
		}
	}
	if err := unix.Unshare(unix.CLONE_FS); err != nil {
		return fmt.Errorf("unsharing fs: %w", err)
	}
	// Joining a mount namespace sets root and working directory to its
	// root: the container's rootfs.
	if err := unix.Setns(int(iso.mntns.Fd()), unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("joining the container's mount namespace: %w", err)
	}
	return chdir(cwd)
}

func chdir(cwd string) error {
	if cwd == "" {
		cwd = "/"
	}
	if err := unix.Chdir(cwd); err != nil {
		return fmt.Errorf("working directory %q: %w: %w", cwd, err, errdefs.ErrInvalidArgument)
	}
	return nil
}

// skipDestinations are kernel file systems a WASI module cannot use.
var skipDestinations = []string{"/proc", "/sys", "/dev/pts", "/dev/mqueue", "/dev/shm"}

// skipTypes are mount types that make no sense without a Linux process.
var skipTypes = map[string]bool{
	"proc": true, "sysfs": true, "devpts": true, "mqueue": true, "cgroup": true, "cgroup2": true,
}

// skipMount reports whether a CRI mount is left out of a Wasm container.
func skipMount(m Mount) bool {
	if skipTypes[m.Type] {
		return true
	}
	dest := path.Clean("/" + m.Destination)
	if dest == "/dev" {
		return true
	}
	for _, d := range skipDestinations {
		if dest == d || strings.HasPrefix(dest, d+"/") {
			return true
		}
	}
	return false
}

// mountInRoot mounts a CRI mount at its destination inside root, resolving
// the destination as if root were "/" (symlinks in the image cannot lead
// out of it).
func mountInRoot(root string, m Mount) error {
	if skipMount(m) {
		return nil
	}
	if m.Destination == "" || !path.IsAbs(m.Destination) {
		return fmt.Errorf("mount destination %q must be absolute: %w", m.Destination, errdefs.ErrInvalidArgument)
	}
	dest, err := securejoin.SecureJoin(root, m.Destination)
	if err != nil {
		return fmt.Errorf("mount destination %q: %w: %w", m.Destination, err, errdefs.ErrInvalidArgument)
	}
	flags, data := mountFlags(m.Options)
	bind := flags&unix.MS_BIND != 0 || m.Type == "bind"
	if bind {
		st, err := os.Stat(m.Source)
		if err != nil {
			return fmt.Errorf("mount source: %w: %w", err, errdefs.ErrInvalidArgument)
		}
		if err := makeMountPoint(dest, st.IsDir()); err != nil {
			return fmt.Errorf("mount point %s: %w", m.Destination, err)
		}
		bflags := uintptr(unix.MS_BIND) | flags&unix.MS_REC
		if err := unix.Mount(m.Source, dest, "", bflags, ""); err != nil {
			return fmt.Errorf("binding %s at %s: %w", m.Source, m.Destination, err)
		}
		rest := flags&^(unix.MS_BIND|unix.MS_REC) | unix.MS_NODEV | unix.MS_NOSUID
		if err := unix.Mount("", dest, "", unix.MS_REMOUNT|unix.MS_BIND|rest, ""); err != nil {
			return fmt.Errorf("remounting %s: %w", m.Destination, err)
		}
		return nil
	}
	if m.Type != "tmpfs" {
		return fmt.Errorf("mount type %q at %s is not supported by kuasar-wasm (bind and tmpfs are): %w",
			m.Type, m.Destination, errdefs.ErrInvalidArgument)
	}
	if err := makeMountPoint(dest, true); err != nil {
		return fmt.Errorf("mount point %s: %w", m.Destination, err)
	}
	if err := unix.Mount("tmpfs", dest, "tmpfs", flags|unix.MS_NODEV|unix.MS_NOSUID, strings.Join(data, ",")); err != nil {
		return fmt.Errorf("mounting tmpfs at %s: %w", m.Destination, err)
	}
	return nil
}

func makeMountPoint(dest string, dir bool) error {
	if dir {
		return os.MkdirAll(dest, 0o755)
	}
	if err := os.MkdirAll(filepath.Dir(dest), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(dest, os.O_CREATE|os.O_RDONLY, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}

// mountAt mounts a rootfs mount (as containerd hands it over) at target.
func mountAt(m Mount, target string) error {
	flags, data := mountFlags(m.Options)
	if m.Type == "bind" || flags&unix.MS_BIND != 0 {
		if err := unix.Mount(m.Source, target, "", unix.MS_BIND|flags&unix.MS_REC, ""); err != nil {
			return err
		}
		if flags&unix.MS_RDONLY != 0 {
			return unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, "")
		}
		return nil
	}
	opts := strings.Join(data, ",")
	if len(opts) >= unix.Getpagesize() && m.Type == "overlay" {
		// Too long for the kernel: the thread has its own working
		// directory, so the layers can be named relative to it.
		dir, short, err := shortenLowerdirs(data)
		if err != nil {
			return err
		}
		if err := unix.Chdir(dir); err != nil {
			return err
		}
		defer unix.Chdir("/")
		opts = strings.Join(short, ",")
	}
	return unix.Mount(m.Source, target, m.Type, flags, opts)
}

// shortenLowerdirs rewrites overlay options relative to the common parent
// of the layer directories.
func shortenLowerdirs(data []string) (string, []string, error) {
	var dirs []string
	for _, o := range data {
		k, v, _ := strings.Cut(o, "=")
		switch k {
		case "lowerdir":
			dirs = append(dirs, strings.Split(v, ":")...)
		case "upperdir", "workdir":
			dirs = append(dirs, v)
		}
	}
	if len(dirs) == 0 {
		return "", nil, errors.New("overlay options too long and no layers to shorten")
	}
	common := filepath.Dir(filepath.Dir(dirs[0]))
	for _, d := range dirs {
		for !strings.HasPrefix(d, common+"/") {
			if common == "/" {
				return "", nil, errors.New("overlay layers have no common parent")
			}
			common = filepath.Dir(common)
		}
	}
	rel := func(d string) string { return strings.TrimPrefix(d, common+"/") }
	out := make([]string, 0, len(data))
	for _, o := range data {
		k, v, _ := strings.Cut(o, "=")
		switch k {
		case "lowerdir":
			parts := strings.Split(v, ":")
			for i := range parts {
				parts[i] = rel(parts[i])
			}
			o = k + "=" + strings.Join(parts, ":")
		case "upperdir", "workdir":
			o = k + "=" + rel(v)
		}
		out = append(out, o)
	}
	return common, out, nil
}

// mountFlags splits mount options into flags and file system data.
func mountFlags(options []string) (uintptr, []string) {
	set := map[string]uintptr{
		"ro": unix.MS_RDONLY, "rro": unix.MS_RDONLY, "nosuid": unix.MS_NOSUID, "nodev": unix.MS_NODEV,
		"noexec": unix.MS_NOEXEC, "sync": unix.MS_SYNCHRONOUS, "dirsync": unix.MS_DIRSYNC,
		"noatime": unix.MS_NOATIME, "nodiratime": unix.MS_NODIRATIME, "relatime": unix.MS_RELATIME,
		"strictatime": unix.MS_STRICTATIME, "bind": unix.MS_BIND, "rbind": unix.MS_BIND | unix.MS_REC,
	}
	ignore := map[string]bool{
		"rw": true, "suid": true, "dev": true, "exec": true, "async": true, "atime": true, "diratime": true,
		"norelatime": true, "private": true, "rprivate": true, "shared": true, "rshared": true,
		"slave": true, "rslave": true, "unbindable": true, "runbindable": true, "defaults": true,
	}
	var flags uintptr
	var data []string
	for _, o := range options {
		if f, ok := set[o]; ok {
			flags |= f
		} else if !ignore[o] && !strings.HasPrefix(o, "X-") {
			data = append(data, o)
		}
	}
	return flags, data
}

// setCredentials makes the calling thread, and only it, run as u with
// caps: its file accesses are then checked as that user's, with only the
// capabilities the container keeps (none when it is not root). Go's own
// setuid functions would change every thread of the host.
func setCredentials(u *User, caps *Capabilities) error {
	if caps != nil {
		keep, err := capMask(caps.Bounding)
		if err != nil {
			return err
		}
		for c := 0; c <= lastCap(); c++ {
			if keep&(1<<c) == 0 {
				if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil {
					return fmt.Errorf("dropping capability %d from the bounding set: %w", c, err)
				}
			}
		}
	}
	if u != nil {
		groups := u.AdditionalGids
		var ptr unsafe.Pointer
		if len(groups) > 0 {
			ptr = unsafe.Pointer(&groups[0])
		}
		if _, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, uintptr(len(groups)), uintptr(ptr), 0); e != 0 {
			return fmt.Errorf("setting supplementary groups: %w", e)
		}
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, uintptr(u.GID), uintptr(u.GID), uintptr(u.GID)); e != 0 {
			return fmt.Errorf("setting gid %d: %w", u.GID, e)
		}
		// From root to another user, the kernel clears the thread's
		// capabilities.
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, uintptr(u.UID), uintptr(u.UID), uintptr(u.UID)); e != 0 {
			return fmt.Errorf("setting uid %d: %w", u.UID, e)
		}
	}
	if caps != nil && (u == nil || u.UID == 0) {
		var sets [3]uint64
		for i, names := range [][]string{caps.Effective, caps.Permitted, caps.Inheritable} {
			m, err := capMask(names)
			if err != nil {
				return err
			}
			sets[i] = m
		}
		// As the OCI runtimes: what is effective is permitted too, and
		// nothing outside the bounding set is inheritable.
		sets[1] |= sets[0]
		if bounding, err := capMask(caps.Bounding); err == nil {
			sets[2] &= bounding
		}
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		data := [2]unix.CapUserData{
			{Effective: uint32(sets[0]), Permitted: uint32(sets[1]), Inheritable: uint32(sets[2])},
			{Effective: uint32(sets[0] >> 32), Permitted: uint32(sets[1] >> 32), Inheritable: uint32(sets[2] >> 32)},
		}
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			return fmt.Errorf("setting capabilities: %w", err)
		}
	}
	return nil
}

// capMask turns capability names into a bit mask. Names the kernel does
// not know are left out, as the OCI runtimes do.
func capMask(names []string) (uint64, error) {
	var m uint64
	for _, n := range names {
		n = strings.ToUpper(n)
		if !strings.HasPrefix(n, "CAP_") {
			n = "CAP_" + n
		}
		found := false
		for c := 0; c <= 63; c++ {
			if capability.FromNumber(c) == n {
				if c <= lastCap() {
					m |= 1 << c
				}
				found = true
				break
			}
		}
		if !found {
			return 0, fmt.Errorf("unknown capability %q: %w", n, errdefs.ErrInvalidArgument)
		}
	}
	return m, nil
}

// lastCap is the highest capability the kernel knows, read once (from the
// host's /proc: container threads have none).
var lastCap = sync.OnceValue(func() int {
	if b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap"); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			return n
		}
	}
	return 40
})
