// Package qemu is the QEMU driver of kuasar-vmm (a hypervisor.Hypervisor):
// it turns a VM's configuration into QEMU's command line, and runs a
// started QEMU through its QMP socket (package qmp). QEMU is spawned by
// the node's process keeper, not by the daemon, so that VMs outlive it;
// the driver attaches to it by pid (from its pid file) and QMP socket,
// again after every daemon restart, from the JSON hypervisor.State.
package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/unixsock"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/channel"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/qemu/qmp"
)

// Name is the driver's name in hypervisor.State.
const Name = "qemu"

// DefaultBinary is QEMU's executable, looked up on PATH.
const DefaultBinary = "qemu-system-x86_64"

// Driver is the QEMU hypervisor driver.
type Driver struct{}

var _ hypervisor.Hypervisor = Driver{}

// Name returns "qemu".
func (Driver) Name() string { return Name }

// FindBinary resolves the QEMU executable: configured (a path or a name on
// PATH), else DefaultBinary. A missing QEMU is NotFound, saying what to
// install.
func FindBinary(configured string) (string, error) {
	b := configured
	if b == "" {
		b = DefaultBinary
	}
	p, err := exec.LookPath(b)
	if err != nil {
		return "", fmt.Errorf("QEMU (%s) not found: install Debian's qemu-system-x86 or set the hypervisor path: %w", b, errdefs.ErrNotFound)
	}
	return p, nil
}

// Prepare checks cfg, makes its run directory (removing what an earlier
// VM of the same directory left) and returns the QEMU command to spawn.
func (d Driver) Prepare(ctx context.Context, cfg hypervisor.Config) (*hypervisor.Launch, hypervisor.State, error) {
	if cfg.Channel == "" {
		cfg.Channel = hypervisor.ChannelSerial
	}
	if err := cfg.Validate(); err != nil {
		return nil, hypervisor.State{}, err
	}
	bin, err := FindBinary(cfg.Binary)
	if err != nil {
		return nil, hypervisor.State{}, err
	}
	for what, f := range map[string]string{"kernel (kernel_path)": cfg.Kernel, "initrd (initrd_path)": cfg.Initrd} {
		if _, err := os.Stat(f); err != nil {
			return nil, hypervisor.State{}, fmt.Errorf("guest %s: %v (build it with `make guest`): %w", what, err, errdefs.ErrNotFound)
		}
	}
	if err := os.MkdirAll(cfg.RunDir, 0o700); err != nil {
		return nil, hypervisor.State{}, fmt.Errorf("vm run directory: %w", err)
	}
	st := stateOf(cfg)
	logPath := filepath.Join(cfg.RunDir, logName)
	for _, f := range []string{st.PidFile, st.ControlSocket, st.ChannelSocket, logPath} {
		if f != "" {
			if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
				return nil, hypervisor.State{}, err
			}
		}
	}
	if cfg.Memory.Kind == hypervisor.MemoryFile && cfg.Memory.Share {
		// A template's RAM: QEMU fills the file, which must exist to be
		// bound in a jail. A clone's must exist already.
		f, err := os.OpenFile(cfg.Memory.Path, os.O_CREATE|os.O_WRONLY|unix.O_NOFOLLOW, 0o600)
		if err != nil {
			return nil, hypervisor.State{}, fmt.Errorf("vm memory file: %w", err)
		}
		f.Close()
	}
	log.G(ctx).WithField("vm", cfg.ID).WithField("accel", cfg.Accel).Debug("qemu prepared")
	return &hypervisor.Launch{Path: bin, Args: Argv(cfg), Dir: cfg.RunDir, Log: logPath, Access: access(bin, cfg)}, st, nil
}

// shareCapabilities are what QEMU's 9p server (security_model=passthrough)
// uses on the share's files, as the guest's root: keep owners and modes
// (chown, set-gid bits, file capabilities), reach files of any owner, and
// make the special files a container makes (which it never opens: the
// jail binds the share without devices). Not CAP_DAC_READ_SEARCH, which
// DAC_OVERRIDE covers for paths and which would let open_by_handle_at
// reach the whole file system of any bind.
var shareCapabilities = []string{
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_MKNOD", "CAP_SETFCAP",
}

// access is what a QEMU started for cfg from bin reads and writes once
// running: its binary, libraries and firmware (Debian's are all under
// /usr: the data directory, /usr/share/qemu, links into seabios and ipxe),
// the guest's kernel and initramfs, its run directory (sockets, pid file),
// the shares and a RAM file; /dev/kvm and /dev/vhost-vsock when used.
func access(bin string, cfg hypervisor.Config) hypervisor.Access {
	a := hypervisor.Access{ReadOnly: []string{"/usr"}}
	if real, err := filepath.EvalSymlinks(bin); err == nil && !strings.HasPrefix(real, "/usr/") {
		// A QEMU of its own install (/opt/qemu/bin/...): its tree, if
		// that is a directory of its own (not /opt or /var, which hold
		// other things), else its directory.
		tree := filepath.Dir(filepath.Dir(real))
		if strings.Count(tree, "/") < 2 {
			tree = filepath.Dir(real)
		}
		a.ReadOnly = append(a.ReadOnly, tree)
	}
	for _, p := range []string{"/lib", "/lib64", "/bin", "/etc/ld.so.cache"} {
		if _, err := os.Lstat(p); err == nil {
			a.ReadOnly = append(a.ReadOnly, p)
		}
	}
	a.ReadOnly = append(a.ReadOnly, cfg.Kernel, cfg.Initrd)
	a.Writable = append(a.Writable, cfg.RunDir)
	if cfg.Memory.Kind == hypervisor.MemoryFile {
		a.Writable = append(a.Writable, cfg.Memory.Path)
	}
	for _, s := range cfg.Shares {
		switch {
		case s.Kind == hypervisor.ShareVirtiofs:
			a.Writable = append(a.Writable, filepath.Dir(s.Socket))
		case s.ReadOnly:
			a.ReadOnly = append(a.ReadOnly, s.Path)
			a.Capabilities = shareCapabilities
		default:
			a.Writable = append(a.Writable, s.Path)
			a.Capabilities = shareCapabilities
		}
	}
	if cfg.Accel == hypervisor.AccelKVM {
		a.Devices = append(a.Devices, "/dev/kvm")
	}
	if cfg.Channel == hypervisor.ChannelVsock {
		a.Devices = append(a.Devices, "/dev/vhost-vsock")
	}
	return a
}

// LogTail is the end of the QEMU log in runDir (what QEMU, or the jail
// that starts it, said before exiting), at most limit bytes from its
// last lines; "" if there is none.
func LogTail(runDir string, limit int) string {
	f, st, err := openRunFile(filepath.Join(runDir, logName))
	if err != nil {
		return ""
	}
	defer f.Close()
	off := max(st.Size()-int64(limit), 0)
	b := make([]byte, st.Size()-off)
	n, _ := f.ReadAt(b, off)
	return strings.TrimSpace(strings.ToValidUTF8(string(b[:n]), "?"))
}

// openRunFile opens a file of a VM's run directory, which QEMU can
// write, for reading: a regular file only, never through a symlink nor
// waiting on a FIFO.
func openRunFile(path string) (*os.File, os.FileInfo, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil, err
	}
	st, err := f.Stat()
	if err == nil && !st.Mode().IsRegular() {
		err = fmt.Errorf("%s is not a regular file", path)
	}
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return f, st, nil
}

// readSmallFile reads at most limit bytes of the run directory's file at
// path (openRunFile).
func readSmallFile(path string, limit int) ([]byte, error) {
	f, _, err := openRunFile(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, limit)
	n, err := f.Read(b)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return b[:n], nil
}

func stateOf(cfg hypervisor.Config) hypervisor.State {
	st := hypervisor.State{
		Hypervisor:    Name,
		ID:            cfg.ID,
		RunDir:        cfg.RunDir,
		PidFile:       filepath.Join(cfg.RunDir, pidFileName),
		ControlSocket: filepath.Join(cfg.RunDir, qmpSocketName),
		Channel:       cfg.Channel,
		Accel:         cfg.Accel,
	}
	if cfg.Channel == hypervisor.ChannelVsock {
		st.VsockCID = cfg.VsockCID
	} else {
		st.ChannelSocket = filepath.Join(cfg.RunDir, agentSocket)
	}
	return st
}

// StateIn is the state of whatever VM runs in runDir, known by its files
// only: Attach to it finds the QEMU by its pid file (if its command line
// names the directory's control socket), e.g. to end a VM no record owns.
func StateIn(runDir string) hypervisor.State {
	st := stateOf(hypervisor.Config{ID: filepath.Base(runDir), RunDir: runDir, Channel: hypervisor.ChannelSerial})
	return st
}

// Attach connects to the QEMU of st: it waits for its pid file if st has
// no pid, checks that the process is still the one recorded, and opens
// QMP. A VM that is gone is NotFound.
func (d Driver) Attach(ctx context.Context, st hypervisor.State) (hypervisor.VM, error) {
	return Attach(ctx, st)
}

// Attach is Driver.Attach, returning the QEMU VM.
func Attach(ctx context.Context, st hypervisor.State) (*VM, error) {
	if st.Hypervisor != Name {
		return nil, fmt.Errorf("state of a %q VM given to the QEMU driver: %w", st.Hypervisor, errdefs.ErrInvalidArgument)
	}
	if st.Pid == 0 {
		pid, err := waitPidFile(ctx, st.PidFile)
		if err != nil {
			return nil, err
		}
		if !isQEMUOf(pid, st.ControlSocket) {
			// A QEMU in a PID namespace of its own (jailed) writes its
			// pid there, 1; or the file is stale: ask the socket who
			// serves it.
			if p, err := socketPeerPid(st.ControlSocket); err == nil {
				st.Pid, st.StartTime = p, proc.StartTime(p)
			}
		}
		if st.Pid == 0 {
			st.Pid = pid
		}
	}
	if st.StartTime == 0 {
		// First attach: make sure the pid is this VM's QEMU (a pid file
		// can outlive its process, and the pid be reused), then pin it.
		if !isQEMUOf(st.Pid, st.ControlSocket) {
			return nil, fmt.Errorf("pid %d (from %s) is not the QEMU of vm %s: %w", st.Pid, st.PidFile, st.ID, errdefs.ErrNotFound)
		}
		st.StartTime = proc.StartTime(st.Pid)
	}
	fd, err := proc.OpenPidfd(st.Pid, st.StartTime)
	if err != nil {
		return nil, fmt.Errorf("qemu of vm %s (pid %d) is gone: %v: %w", st.ID, st.Pid, err, errdefs.ErrNotFound)
	}
	vm := &VM{st: st, exited: make(chan struct{})}
	if err := vm.watch(fd); err != nil {
		unix.Close(fd)
		return nil, err
	}
	q, err := dialQMP(ctx, st.ControlSocket, st.Pid, vm.exited)
	if err != nil {
		vm.Close()
		return nil, fmt.Errorf("qemu of vm %s: %w", st.ID, err)
	}
	vm.qmp = q
	return vm, nil
}

// dialQMP connects to QMP, giving up if QEMU exits meanwhile. The socket
// is in the run directory, which QEMU can write: it must be served by pid
// (a link to another VM's socket is refused).
func dialQMP(ctx context.Context, path string, pid int, exited <-chan struct{}) (*qmp.Client, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-exited:
			cancel()
		case <-ctx.Done():
		}
	}()
	q, err := qmp.Dial(ctx, path, func(c net.Conn) error { return unixsock.CheckPeerPid(c, pid) })
	if err != nil {
		select {
		case <-exited:
			return nil, fmt.Errorf("exited before it answered on QMP: %w", errdefs.ErrUnavailable)
		default:
		}
	}
	return q, err
}

// socketPeerPid is the pid of the process serving the Unix socket at
// path, asked of the socket itself (never through a symlink: the run
// directory is QEMU's to write, and a command line is a process's to
// rewrite).
func socketPeerPid(path string) (int, error) {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return 0, fmt.Errorf("%s is not a socket", path)
	}
	c, err := net.Dial("unix", "/proc/self/fd/"+strconv.Itoa(fd))
	if err != nil {
		return 0, err
	}
	defer c.Close()
	pid, err := unixsock.PeerPid(c)
	if err == nil && pid <= 0 {
		err = fmt.Errorf("%s is served from another PID namespace", path)
	}
	return pid, err
}

// isQEMUOf reports whether pid's command line names the QMP socket.
func isQEMUOf(pid int, qmpSocket string) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	return err == nil && strings.Contains(string(b), "path="+escape(qmpSocket)+",")
}

// waitPidFile waits for QEMU to write its pid file (it does so early,
// before the guest starts).
func waitPidFile(ctx context.Context, path string) (int, error) {
	for {
		b, err := readSmallFile(path, 32)
		if err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
				return pid, nil
			}
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("no pid in %s: %w", path, ctx.Err())
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// VM is a running QEMU.
type VM struct {
	st     hypervisor.State
	qmp    *qmp.Client
	exited chan struct{}
	// stopWatch interrupts the pidfd watch on Close.
	stopWatch int
	closeOnce sync.Once
}

var (
	_ hypervisor.VM       = (*VM)(nil)
	_ hypervisor.NICAdder = (*VM)(nil)
)

// watch closes vm.exited once the process behind pidfd exits.
func (vm *VM) watch(pidfd int) error {
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		return err
	}
	vm.stopWatch = efd
	go func() {
		defer unix.Close(pidfd)
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}, {Fd: int32(efd), Events: unix.POLLIN}}
		for {
			_, err := unix.Poll(fds, -1)
			if err == unix.EINTR {
				continue
			}
			if err == nil && fds[1].Revents != 0 {
				return // Close: stop watching, the VM runs on
			}
			close(vm.exited)
			return
		}
	}()
	return nil
}

// Pid is QEMU's pid.
func (vm *VM) Pid() int { return vm.st.Pid }

// State is the VM's record.
func (vm *VM) State() hypervisor.State { return vm.st }

// QMP is the VM's QMP connection.
func (vm *VM) QMP() *qmp.Client { return vm.qmp }

// Exited is closed when QEMU has exited.
func (vm *VM) Exited() <-chan struct{} { return vm.exited }

// ConsoleSize is the guest console's ring in QEMU (a power of two).
const ConsoleSize = 64 << 10

// Console returns the end of the guest's console, at most n bytes, or ""
// when QEMU does not answer. Reading empties the ring.
func (vm *VM) Console(ctx context.Context, n int) string {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var out string
	if err := vm.qmp.Execute(ctx, "ringbuf-read", map[string]any{"device": consoleID, "size": ConsoleSize, "format": "utf8"}, &out); err != nil {
		return ""
	}
	if len(out) > n {
		out = out[len(out)-n:]
	}
	return out
}

// DialAgent starts a channel session with the guest agent.
func (vm *VM) DialAgent(ctx context.Context) (net.Conn, error) {
	if vm.st.Channel == hypervisor.ChannelVsock {
		return nil, fmt.Errorf("vsock channel: not implemented yet: %w", errdefs.ErrNotImplemented)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-vm.exited:
			cancel()
		case <-ctx.Done():
		}
	}()
	// Served by this VM's QEMU, not through a link its guest's QEMU put
	// in the run directory.
	pid := vm.st.Pid
	c, err := channel.DialUnix(ctx, vm.st.ChannelSocket, channel.WithPeerCheck(func(c net.Conn) error { return unixsock.CheckPeerPid(c, pid) }))
	if err != nil {
		select {
		case <-vm.exited:
			return nil, fmt.Errorf("vm %s exited before its agent answered (QEMU's output is in %s): %w", vm.st.ID, filepath.Join(vm.st.RunDir, logName), errdefs.ErrUnavailable)
		default:
		}
		return nil, err
	}
	return c, nil
}

// Resume starts the CPUs of a VM started paused (or restored).
func (vm *VM) Resume(ctx context.Context) error { return vm.qmp.Cont(ctx) }

// Stop makes QEMU quit, kills it if it has not exited when ctx is done
// (or after 10 s without a deadline), and waits for it to be gone.
func (vm *VM) Stop(ctx context.Context) error {
	select {
	case <-vm.exited:
		return nil
	default:
	}
	grace := ctx
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		grace, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	if vm.qmp != nil {
		if err := vm.qmp.Quit(grace); err != nil {
			log.G(ctx).WithError(err).WithField("vm", vm.st.ID).Warn("qmp quit failed; terminating qemu")
			_ = proc.Signal(vm.st.Pid, vm.st.StartTime, unix.SIGTERM)
		}
	} else {
		_ = proc.Signal(vm.st.Pid, vm.st.StartTime, unix.SIGTERM)
	}
	select {
	case <-vm.exited:
		return nil
	case <-grace.Done():
	}
	log.G(ctx).WithField("vm", vm.st.ID).Warn("qemu did not quit in time; killing it")
	if err := proc.Signal(vm.st.Pid, vm.st.StartTime, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("killing qemu of vm %s: %w", vm.st.ID, err)
	}
	select {
	case <-vm.exited:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("qemu of vm %s (pid %d) does not die", vm.st.ID, vm.st.Pid)
	}
}

// Wait returns once QEMU has exited.
func (vm *VM) Wait(ctx context.Context) error {
	select {
	case <-vm.exited:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close drops the QMP connection and the exit watch, leaving QEMU running.
func (vm *VM) Close() error {
	vm.closeOnce.Do(func() {
		if vm.qmp != nil {
			vm.qmp.Close()
		}
		if vm.stopWatch > 0 {
			_, _ = unix.Write(vm.stopWatch, []byte{1, 0, 0, 0, 0, 0, 0, 0})
		}
	})
	return nil
}

// Cleanup removes the run directory of an exited VM.
func (vm *VM) Cleanup() error {
	select {
	case <-vm.exited:
	default:
		return fmt.Errorf("vm %s still runs (pid %d): %w", vm.st.ID, vm.st.Pid, errdefs.ErrFailedPrecondition)
	}
	vm.Close()
	return os.RemoveAll(vm.st.RunDir)
}

// AddNIC plugs a virtio-net device backed by the tap nic names into a free
// hotplug slot (the i-th NIC of the VM goes to slot i).
func (vm *VM) AddNIC(ctx context.Context, nic hypervisor.NIC) error {
	props := map[string]any{}
	if nic.TapFD != 0 {
		fdName := "fd-" + nic.ID
		if err := vm.qmp.GetFD(ctx, fdName, int(nic.TapFD)); err != nil {
			return fmt.Errorf("passing the tap of %s: %w", nic.ID, err)
		}
		props["fd"] = fdName
	} else {
		props["ifname"] = nic.TapName
		props["script"] = "no"
		props["downscript"] = "no"
	}
	if err := vm.qmp.NetdevAdd(ctx, "tap", "net-"+nic.ID, props); err != nil {
		return err
	}
	slot, err := vm.freeSlot(ctx)
	if err != nil {
		_ = vm.qmp.NetdevDel(ctx, "net-"+nic.ID)
		return err
	}
	dev := map[string]any{"netdev": "net-" + nic.ID, "bus": slot}
	if nic.MAC != "" {
		dev["mac"] = nic.MAC
	}
	if err := vm.qmp.DeviceAdd(ctx, "virtio-net-pci", nic.ID, dev); err != nil {
		_ = vm.qmp.NetdevDel(ctx, "net-"+nic.ID)
		return err
	}
	return nil
}

// RemoveNIC unplugs a NIC added with AddNIC.
func (vm *VM) RemoveNIC(ctx context.Context, id string) error {
	if err := vm.qmp.DeviceDel(ctx, id); err != nil {
		return err
	}
	return vm.qmp.NetdevDel(ctx, "net-"+id)
}

// freeSlot finds a hotplug slot with no device.
func (vm *VM) freeSlot(ctx context.Context) (string, error) {
	var buses []struct {
		Bus     int `json:"bus"`
		Devices []struct {
			QdevID string `json:"qdev_id"`
			Bridge *struct {
				Devices []json0 `json:"devices"`
			} `json:"pci_bridge"`
		} `json:"devices"`
	}
	if err := vm.qmp.Execute(ctx, "query-pci", nil, &buses); err != nil {
		return "", err
	}
	for _, b := range buses {
		for _, d := range b.Devices {
			if strings.HasPrefix(d.QdevID, "hp") && d.Bridge != nil && len(d.Bridge.Devices) == 0 {
				return d.QdevID, nil
			}
		}
	}
	return "", fmt.Errorf("vm %s has no free hotplug slot: %w", vm.st.ID, errdefs.ErrResourceExhausted)
}

// json0 is any JSON value, ignored.
type json0 = struct{}
