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
	pathrs "github.com/cyphar/filepath-securejoin/pathrs-lite"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost/api"
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
func isolateInit(req *api.CreateRequest) (_ *isolation, retErr error) {
	root := req.GetRootfsDir()
	if !filepath.IsAbs(root) {
		return nil, fmt.Errorf("rootfs dir %q is not absolute: %w", root, errdefs.ErrInvalidArgument)
	}
	var netns *os.File
	if req.GetNetns() != "" {
		var err error
		if netns, err = os.Open(req.GetNetns()); err != nil {
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
	if len(req.GetRootfs()) > 0 {
		if err := os.MkdirAll(root, 0o711); err != nil {
			return nil, err
		}
		for _, m := range req.GetRootfs() {
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
	rootDir, err := os.OpenFile(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening rootfs: %w", err)
	}
	defer rootDir.Close()
	for _, m := range req.GetMounts() {
		if err := mountInRoot(rootDir, m); err != nil {
			return nil, err
		}
	}
	// No device node or set-user-ID bit of the image has any effect: the
	// module runs on a thread of a root process, outside any device cgroup.
	rootFlags := uintptr(unix.MS_REMOUNT | unix.MS_BIND | unix.MS_NODEV | unix.MS_NOSUID)
	if req.GetReadonly() {
		rootFlags |= unix.MS_RDONLY
	}
	if err := unix.Mount("", root, "", rootFlags, ""); err != nil {
		return nil, fmt.Errorf("remounting rootfs (nodev, nosuid, read-only: %v): %w", req.GetReadonly(), err)
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
	return iso, chdir(req.GetProcess().GetCwd())
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
func skipMount(m *api.Mount) bool {
	if skipTypes[m.GetType()] {
		return true
	}
	dest := path.Clean("/" + m.GetDestination())
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

// mountInRoot mounts a CRI mount at its destination inside root. The
// destination is resolved, and made when missing, through handles
// (securejoin's pathrs-lite): every component is resolved as if root were
// "/", and a symlink swapped into a volume meanwhile (by a container that
// shares it) cannot redirect it out of root. The mount is attached to the
// handle, never to a path looked up again.
func mountInRoot(root *os.File, m *api.Mount) error {
	if skipMount(m) {
		return nil
	}
	dest := m.GetDestination()
	if dest == "" || !path.IsAbs(dest) {
		return fmt.Errorf("mount destination %q must be absolute: %w", dest, errdefs.ErrInvalidArgument)
	}
	o := parseMountOptions(m.GetOptions())
	if o.bind || m.GetType() == "bind" {
		// The source is the host's (CRI's), named by path as CRI gave it;
		// held open from here on, so what is checked is what is mounted.
		src, err := os.OpenFile(m.GetSource(), unix.O_PATH|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("mount source: %w: %w", err, errdefs.ErrInvalidArgument)
		}
		defer src.Close()
		st, err := src.Stat()
		if err != nil {
			return fmt.Errorf("mount source: %w: %w", err, errdefs.ErrInvalidArgument)
		}
		target, err := mountPoint(root, dest, st.IsDir())
		if err != nil {
			return fmt.Errorf("mount point %s: %w", dest, err)
		}
		defer target.Close()
		if err := bindAt(src, target, o); err != nil {
			return fmt.Errorf("binding %s at %s: %w", m.GetSource(), dest, err)
		}
		return nil
	}
	if m.GetType() != "tmpfs" {
		return fmt.Errorf("mount type %q at %s is not supported by kuasar-wasm (bind and tmpfs are): %w",
			m.GetType(), dest, errdefs.ErrInvalidArgument)
	}
	target, err := mountPoint(root, dest, true)
	if err != nil {
		return fmt.Errorf("mount point %s: %w", dest, err)
	}
	defer target.Close()
	if err := unix.Mount("tmpfs", procFD(target), "tmpfs", o.flags|unix.MS_NODEV|unix.MS_NOSUID, strings.Join(o.data, ",")); err != nil {
		return fmt.Errorf("mounting tmpfs at %s: %w", dest, err)
	}
	return nil
}

// procFD names an open file by its descriptor, for calls that take a path.
func procFD(f *os.File) string { return "/proc/self/fd/" + strconv.Itoa(int(f.Fd())) }

// mountPoint opens (making it if missing) the directory or file dest inside
// root, resolving every component inside root.
func mountPoint(root *os.File, dest string, dir bool) (*os.File, error) {
	if dir {
		return pathrs.MkdirAllHandle(root, dest, 0o755)
	}
	if f, err := pathrs.OpenatInRoot(root, dest); err == nil {
		return f, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	parent, err := pathrs.MkdirAllHandle(root, path.Dir(path.Clean(dest)), 0o755)
	if err != nil {
		return nil, err
	}
	defer parent.Close()
	name := path.Base(path.Clean(dest))
	fd, err := unix.Openat(int(parent.Fd()), name, unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_RDONLY|unix.O_CLOEXEC, 0o644)
	if errors.Is(err, unix.EEXIST) {
		// Made meanwhile: resolve it again, inside root.
		return pathrs.OpenatInRoot(root, dest)
	}
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), dest), nil
}

// bindAt binds src onto the mount point target: a detached copy of src's
// mount (with its submounts for rbind) is made, its attributes set
// (nodev and nosuid always, and for every submount too; read-only, of the
// top mount for "ro", of every submount for "rro"), and only then attached
// at target.
func bindAt(src, target *os.File, o mountOptions) error {
	flags := uint(unix.OPEN_TREE_CLONE | unix.OPEN_TREE_CLOEXEC | unix.AT_EMPTY_PATH)
	if o.recursive {
		flags |= unix.AT_RECURSIVE
	}
	tree, err := unix.OpenTree(int(src.Fd()), "", flags)
	if err != nil {
		return fmt.Errorf("open_tree: %w", err)
	}
	defer unix.Close(tree)
	all := o.attr | unix.MOUNT_ATTR_NODEV | unix.MOUNT_ATTR_NOSUID
	if o.recursiveReadonly {
		all |= unix.MOUNT_ATTR_RDONLY
	}
	if err := unix.MountSetattr(tree, "", unix.AT_EMPTY_PATH|unix.AT_RECURSIVE, &unix.MountAttr{Attr_set: all}); err != nil {
		return fmt.Errorf("mount_setattr: %w", err)
	}
	if o.readonly && !o.recursiveReadonly {
		if err := unix.MountSetattr(tree, "", unix.AT_EMPTY_PATH, &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY}); err != nil {
			return fmt.Errorf("mount_setattr (read-only): %w", err)
		}
	}
	if err := unix.MoveMount(tree, "", int(target.Fd()), "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount: %w", err)
	}
	return nil
}

// mountAt mounts a rootfs mount (as containerd hands it over) at target.
func mountAt(m *api.Mount, target string) error {
	o := parseMountOptions(m.GetOptions())
	if m.GetType() == "bind" || o.bind {
		rec := uintptr(0)
		if o.recursive {
			rec = unix.MS_REC
		}
		if err := unix.Mount(m.GetSource(), target, "", unix.MS_BIND|rec, ""); err != nil {
			return err
		}
		if o.readonly {
			return unix.Mount("", target, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, "")
		}
		return nil
	}
	opts := strings.Join(o.data, ",")
	if len(opts) >= unix.Getpagesize() && m.GetType() == "overlay" {
		// Too long for the kernel: the thread has its own working
		// directory, so the layers can be named relative to it.
		dir, short, err := shortenLowerdirs(o.data)
		if err != nil {
			return err
		}
		if err := unix.Chdir(dir); err != nil {
			return err
		}
		defer unix.Chdir("/")
		opts = strings.Join(short, ",")
	}
	return unix.Mount(m.GetSource(), target, m.GetType(), o.flags, opts)
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

// mountOptions are OCI mount options, as the host applies them.
type mountOptions struct {
	// flags and data are for mount(2) (tmpfs, rootfs mounts).
	flags uintptr
	data  []string
	// For binds: bind is set by "bind" and "rbind", recursive by "rbind";
	// readonly by "ro" (the top mount) and recursiveReadonly by "rro"
	// (every submount too); attr are the other MOUNT_ATTR_* flags.
	bind, recursive             bool
	readonly, recursiveReadonly bool
	attr                        uint64
}

// parseMountOptions splits mount options into flags, attributes and file
// system data.
func parseMountOptions(options []string) mountOptions {
	type opt struct {
		flag uintptr
		attr uint64
	}
	set := map[string]opt{
		"ro": {unix.MS_RDONLY, 0}, "rro": {unix.MS_RDONLY, 0},
		"nosuid": {unix.MS_NOSUID, unix.MOUNT_ATTR_NOSUID}, "nodev": {unix.MS_NODEV, unix.MOUNT_ATTR_NODEV},
		"noexec": {unix.MS_NOEXEC, unix.MOUNT_ATTR_NOEXEC}, "sync": {unix.MS_SYNCHRONOUS, 0}, "dirsync": {unix.MS_DIRSYNC, 0},
		"noatime": {unix.MS_NOATIME, unix.MOUNT_ATTR_NOATIME}, "nodiratime": {unix.MS_NODIRATIME, unix.MOUNT_ATTR_NODIRATIME},
		"relatime": {unix.MS_RELATIME, unix.MOUNT_ATTR_RELATIME}, "strictatime": {unix.MS_STRICTATIME, unix.MOUNT_ATTR_STRICTATIME},
		"bind": {unix.MS_BIND, 0}, "rbind": {unix.MS_BIND | unix.MS_REC, 0},
	}
	ignore := map[string]bool{
		"rw": true, "suid": true, "dev": true, "exec": true, "async": true, "atime": true, "diratime": true,
		"norelatime": true, "private": true, "rprivate": true, "shared": true, "rshared": true,
		"slave": true, "rslave": true, "unbindable": true, "runbindable": true, "defaults": true,
	}
	var o mountOptions
	for _, name := range options {
		f, ok := set[name]
		switch {
		case ok:
			o.flags |= f.flag
			o.attr |= f.attr
		case !ignore[name] && !strings.HasPrefix(name, "X-"):
			o.data = append(o.data, name)
		}
		switch name {
		case "bind":
			o.bind = true
		case "rbind":
			o.bind, o.recursive = true, true
		case "ro":
			o.readonly = true
		case "rro":
			o.readonly, o.recursiveReadonly = true, true
		}
	}
	return o
}

// setCredentials makes the calling thread, and only it, run as u with
// caps: its file accesses are then checked as that user's, with only the
// capabilities the container keeps (none when it is not root). Go's own
// setuid functions would change every thread of the host.
func setCredentials(u *api.User, caps *api.Capabilities) error {
	if caps != nil {
		keep, err := capMask(caps.GetBounding())
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
		groups := u.GetAdditionalGids()
		var ptr unsafe.Pointer
		if len(groups) > 0 {
			ptr = unsafe.Pointer(&groups[0])
		}
		if _, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, uintptr(len(groups)), uintptr(ptr), 0); e != 0 {
			return fmt.Errorf("setting supplementary groups: %w", e)
		}
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, uintptr(u.GetGid()), uintptr(u.GetGid()), uintptr(u.GetGid())); e != 0 {
			return fmt.Errorf("setting gid %d: %w", u.GetGid(), e)
		}
		// From root to another user, the kernel clears the thread's
		// capabilities.
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, uintptr(u.GetUid()), uintptr(u.GetUid()), uintptr(u.GetUid())); e != 0 {
			return fmt.Errorf("setting uid %d: %w", u.GetUid(), e)
		}
	}
	if caps != nil && u.GetUid() == 0 {
		var sets [3]uint64
		for i, names := range [][]string{caps.GetEffective(), caps.GetPermitted(), caps.GetInheritable()} {
			m, err := capMask(names)
			if err != nil {
				return err
			}
			sets[i] = m
		}
		// As the OCI runtimes: what is effective is permitted too, and
		// nothing outside the bounding set is inheritable.
		sets[1] |= sets[0]
		if bounding, err := capMask(caps.GetBounding()); err == nil {
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
