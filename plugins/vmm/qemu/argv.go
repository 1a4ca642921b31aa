package qemu

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
)

// Files of a VM's run directory.
const (
	pidFileName   = "qemu.pid"
	qmpSocketName = "qmp.sock"
	agentSocket   = "agent.sock"
	consoleID     = "console"
	logName       = "qemu.log"
)

// memoryID is the id of the guest RAM backend. It names the RAM block in
// a migration stream, so a template and its clones must agree on it.
const memoryID = "mem0"

// DefaultKernelArgs come before Config.KernelArgs. The kernel's console is
// the first serial port (a file in the run directory); quiet keeps TCG from
// spending time on it. panic=-1 with -no-reboot makes a guest panic end
// the VM. cryptomgr.notests skips the crypto self-tests (0.3 s under TCG).
var DefaultKernelArgs = []string{
	"console=ttyS0", "quiet", "panic=-1", "8250.nr_uarts=1", "cryptomgr.notests", "random.trust_cpu=on",
}

// Argv returns the QEMU arguments (without the binary) for cfg, whose
// run directory files are named as Prepare names them. The machine is q35:
// PCIe hotplug (a NIC added to a template clone) and vmgenid (a restored
// clone reseeds its RNG). Nothing is there by default (-nodefaults): every
// device is listed.
func Argv(cfg hypervisor.Config) []string {
	run := func(name string) string { return escape(filepath.Join(cfg.RunDir, name)) }
	mem := strconv.Itoa(cfg.MemoryMiB) + "M"
	a := []string{
		"-name", cfg.ID,
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-machine", "q35,smm=off,vmport=off,sata=off,usb=off,smbus=off,i8042=off,hpet=off,memory-backend=" + memoryID,
	}
	switch cfg.Accel {
	case hypervisor.AccelKVM:
		a = append(a, "-accel", "kvm", "-cpu", "host")
	default:
		tcg := "tcg"
		if cfg.TBSizeMiB > 0 {
			tcg += ",tb-size=" + strconv.Itoa(cfg.TBSizeMiB)
		}
		a = append(a, "-accel", tcg, "-cpu", "max")
	}
	a = append(a, "-smp", strconv.Itoa(cfg.VCPUs), "-m", mem, "-object", memoryObject(cfg.Memory, mem))

	a = append(a,
		"-kernel", cfg.Kernel, "-initrd", cfg.Initrd,
		"-append", strings.Join(append(append([]string{}, DefaultKernelArgs...), cfg.KernelArgs...), " "),
		"-pidfile", run(pidFileName),
		"-chardev", "socket,id=qmp,path="+run(qmpSocketName)+",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
		// The guest's console, kept in QEMU's memory: a ring of
		// ConsoleSize bytes (an untrusted guest writes it forever), read
		// over QMP (VM.Console).
		"-chardev", fmt.Sprintf("ringbuf,id=%s,size=%d", consoleID, ConsoleSize),
		"-serial", "chardev:console",
		"-device", "vmgenid,guid=auto",
	)
	switch cfg.Channel {
	case hypervisor.ChannelVsock:
		a = append(a, "-device", fmt.Sprintf("vhost-vsock-pci,id=vsock0,guest-cid=%d", cfg.VsockCID))
	default:
		a = append(a,
			"-device", "virtio-serial-pci,id=vser0,max_ports=2",
			"-chardev", "socket,id=agent,path="+run(agentSocket)+",server=on,wait=off",
			"-device", "virtserialport,bus=vser0.0,nr=1,chardev=agent,name="+guest.PortName,
		)
	}
	for i, s := range cfg.Shares {
		switch s.Kind {
		case hypervisor.ShareVirtiofs:
			a = append(a,
				"-chardev", fmt.Sprintf("socket,id=vfs%d,path=%s", i, escape(s.Socket)),
				"-device", fmt.Sprintf("vhost-user-fs-pci,chardev=vfs%d,tag=%s", i, s.Tag),
			)
		default:
			fsdev := fmt.Sprintf("local,id=fs%d,path=%s,security_model=passthrough,multidevs=remap", i, escape(s.Path))
			if s.ReadOnly {
				fsdev += ",readonly=on"
			}
			a = append(a, "-fsdev", fsdev, "-device", fmt.Sprintf("virtio-9p-pci,fsdev=fs%d,mount_tag=%s", i, s.Tag))
		}
	}
	for i := range cfg.HotplugSlots {
		a = append(a, "-device", fmt.Sprintf("pcie-root-port,id=%s,bus=pcie.0,chassis=%d", slotID(i), i+1))
	}
	// The VMM may not gain privileges, use obsolete system calls or, unless
	// a template is being saved through an exec: URI, start processes.
	sandbox := "on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny"
	if !cfg.AllowSpawn {
		sandbox += ",spawn=deny"
	}
	a = append(a, "-sandbox", sandbox)
	if cfg.StartPaused {
		a = append(a, "-S")
	}
	if cfg.Incoming {
		a = append(a, "-incoming", "defer")
	}
	return append(a, cfg.Extra...)
}

func memoryObject(m hypervisor.MemoryBackend, size string) string {
	share := "off"
	if m.Share {
		share = "on"
	}
	if m.Kind == hypervisor.MemoryFile {
		return fmt.Sprintf("memory-backend-file,id=%s,size=%s,mem-path=%s,share=%s", memoryID, size, escape(m.Path), share)
	}
	return fmt.Sprintf("memory-backend-memfd,id=%s,size=%s,share=%s", memoryID, size, share)
}

// slotID names the i-th hotplug slot (a PCIe root port).
func slotID(i int) string { return "hp" + strconv.Itoa(i) }

// escape doubles the commas of a value in a QEMU option list.
func escape(v string) string { return strings.ReplaceAll(v, ",", ",,") }
