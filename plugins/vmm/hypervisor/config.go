package hypervisor

import (
	"fmt"
	"path/filepath"

	"github.com/containerd/errdefs"
)

// Config describes one VM.
type Config struct {
	// ID names the VM (the sandbox id).
	ID string
	// RunDir holds the VM's sockets, pid file and the VMM's log. Unix
	// socket paths are limited to 107 bytes: keep it short
	// (MaxRunDirLen).
	RunDir string
	// Binary is the VMM executable (the driver's default if empty).
	Binary string

	Kernel     string   // uncompressed kernel (vmlinux, PVH entry)
	Initrd     string   // initramfs
	KernelArgs []string // appended to the driver's defaults

	VCPUs     int
	MemoryMiB int
	Accel     Accel // AccelKVM or AccelTCG (see ResolveAccel)
	// TBSizeMiB is TCG's translation cache (QEMU's default is 1 GiB,
	// which a small VM never needs and which costs memory as it fills).
	TBSizeMiB int

	Memory MemoryBackend

	// Channel is how the host reaches the agent.
	Channel ChannelKind
	// VsockCID is the guest's vsock context id, with ChannelVsock.
	VsockCID uint32

	// Shares are host directories the guest mounts.
	Shares []Share

	// HotplugSlots is how many network interfaces (or other PCIe devices)
	// can be added while the VM runs.
	HotplugSlots int

	// StartPaused starts the VM with its CPUs stopped, for devices to be
	// added before the guest runs (then VM resume).
	StartPaused bool
	// Incoming starts the VM waiting for its state to be restored (a
	// template clone): QEMU's -incoming defer.
	Incoming bool
	// AllowSpawn lets the VMM start processes (QEMU's exec: migration
	// URIs, used to save a template); denied otherwise.
	AllowSpawn bool

	// Extra are VMM arguments appended as they are.
	Extra []string
}

// MemoryBackend is where guest RAM lives.
type MemoryBackend struct {
	// Kind is "memfd" (default: anonymous memory; shareable with
	// virtiofsd when Share is set) or "file" (Path, on a tmpfs: a
	// template's RAM, mapped share=on by the template and share=off by
	// its clones, which then get copy-on-write pages of it).
	Kind  string
	Path  string
	Share bool
}

// Memory backend kinds.
const (
	MemoryMemfd = "memfd"
	MemoryFile  = "file"
)

// ChannelKind is the transport of the host<->agent channel.
type ChannelKind string

// Channel kinds.
const (
	// ChannelSerial is a virtio-serial port whose host end is a Unix
	// socket the VMM serves; plugins/vmm/channel runs over it.
	ChannelSerial ChannelKind = "serial"
	// ChannelVsock is virtio-vsock (needs /dev/vhost-vsock on the node).
	ChannelVsock ChannelKind = "vsock"
)

// Share is a host directory shared with the guest under a tag.
type Share struct {
	Tag      string
	Path     string
	ReadOnly bool
	// Kind is "9p" (default) or "virtiofs" (Socket is virtiofsd's
	// vhost-user socket; needs Memory.Share).
	Kind   string
	Socket string
}

// Share kinds.
const (
	Share9P       = "9p"
	ShareVirtiofs = "virtiofs"
)

// NIC is a network interface of the guest, backed by a tap device.
type NIC struct {
	ID  string // device id, unique in the VM
	MAC string // the guest's MAC address
	// TapFD is an open tap (/dev/net/tun, TUNSETIFF) the VMM receives; or
	// TapName, a tap the VMM opens itself in its own network namespace.
	TapFD   uintptr
	TapName string
}

// MaxSocketPath is the longest path a Unix socket may have.
const MaxSocketPath = 107

// MaxRunDirLen leaves room in MaxSocketPath for the longest socket name a
// driver puts in a run directory.
const MaxRunDirLen = MaxSocketPath - 16

// Validate checks what every driver needs.
func (c *Config) Validate() error {
	switch {
	case c.ID == "":
		return fmt.Errorf("vm: no id: %w", errdefs.ErrInvalidArgument)
	case !filepath.IsAbs(c.RunDir):
		return fmt.Errorf("vm run directory %q is not absolute: %w", c.RunDir, errdefs.ErrInvalidArgument)
	case len(c.RunDir) > MaxRunDirLen:
		return fmt.Errorf("vm run directory %q is %d bytes, more than %d (Unix socket paths are limited to %d bytes): %w",
			c.RunDir, len(c.RunDir), MaxRunDirLen, MaxSocketPath, errdefs.ErrInvalidArgument)
	case c.Kernel == "" || c.Initrd == "":
		return fmt.Errorf("vm: kernel and initrd are required (kernel_path, initrd_path): %w", errdefs.ErrInvalidArgument)
	case c.VCPUs < 1:
		return fmt.Errorf("vm: %d vCPUs: %w", c.VCPUs, errdefs.ErrInvalidArgument)
	case c.MemoryMiB < 64:
		return fmt.Errorf("vm: %d MiB of memory, less than 64: %w", c.MemoryMiB, errdefs.ErrInvalidArgument)
	case c.Accel != AccelKVM && c.Accel != AccelTCG:
		return fmt.Errorf("vm: accelerator %q (resolve it with ResolveAccel): %w", c.Accel, errdefs.ErrInvalidArgument)
	}
	switch c.Channel {
	case "", ChannelSerial:
	case ChannelVsock:
		if c.VsockCID < 3 {
			return fmt.Errorf("vm: vsock CID %d (3 or more): %w", c.VsockCID, errdefs.ErrInvalidArgument)
		}
	default:
		return fmt.Errorf("vm: channel %q: %w", c.Channel, errdefs.ErrInvalidArgument)
	}
	switch c.Memory.Kind {
	case "", MemoryMemfd:
	case MemoryFile:
		if !filepath.IsAbs(c.Memory.Path) {
			return fmt.Errorf("vm: memory file %q is not absolute: %w", c.Memory.Path, errdefs.ErrInvalidArgument)
		}
	default:
		return fmt.Errorf("vm: memory backend %q: %w", c.Memory.Kind, errdefs.ErrInvalidArgument)
	}
	tags := map[string]bool{}
	for _, s := range c.Shares {
		if s.Tag == "" || len(s.Tag) > 31 || tags[s.Tag] {
			return fmt.Errorf("vm: share tag %q (non-empty, unique, at most 31 bytes): %w", s.Tag, errdefs.ErrInvalidArgument)
		}
		tags[s.Tag] = true
		switch s.Kind {
		case "", Share9P:
			if !filepath.IsAbs(s.Path) {
				return fmt.Errorf("vm: share %s: path %q is not absolute: %w", s.Tag, s.Path, errdefs.ErrInvalidArgument)
			}
		case ShareVirtiofs:
			if s.Socket == "" || !c.Memory.Share {
				return fmt.Errorf("vm: virtio-fs share %s needs virtiofsd's socket and shared memory: %w", s.Tag, errdefs.ErrInvalidArgument)
			}
		default:
			return fmt.Errorf("vm: share %s: kind %q: %w", s.Tag, s.Kind, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// Launch is how to start a VMM: what the process keeper spawns.
type Launch struct {
	Path string
	Args []string // without Path
	Env  []string
	Dir  string
	// Log is where the VMM's own output (stdout and stderr) should go;
	// the guest's console is read with VM.Console.
	Log string
	// Access is what the VMM needs of the node once started, for a jail
	// (package jail) that gives it that and nothing more.
	Access Access
}

// Access lists what a VMM process reaches of the node: absolute paths,
// and the only capabilities it keeps.
type Access struct {
	ReadOnly     []string // binaries, libraries, firmware, the guest's kernel
	Writable     []string // its run directory, shares, a RAM file
	Devices      []string // /dev/kvm, /dev/vhost-vsock...
	Capabilities []string // as "CAP_CHOWN"
}

// State is a VM's record: enough for any later daemon to attach to it
// again. It is JSON.
type State struct {
	Hypervisor string `json:"hypervisor"`
	ID         string `json:"id"`
	// Pid and StartTime (clock ticks since boot, /proc/PID/stat) identify
	// the VMM process; a recycled pid is never taken for it.
	Pid       int    `json:"pid,omitempty"`
	StartTime uint64 `json:"startTime,omitempty"`

	RunDir        string      `json:"runDir"`
	PidFile       string      `json:"pidFile"`
	ControlSocket string      `json:"controlSocket"` // QEMU: QMP
	Channel       ChannelKind `json:"channel"`
	// ChannelSocket is the host end of a serial channel.
	ChannelSocket string `json:"channelSocket,omitempty"`
	VsockCID      uint32 `json:"vsockCid,omitempty"`
	Accel         Accel  `json:"accel"`
}
