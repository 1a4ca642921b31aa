package vmm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/qemu"
)

// A template is a VM booted once, for one guest image and VM size, to the
// point where its agent waits for a pod, and saved: its RAM stays in a file
// on a tmpfs (mapped shared by the template), its device state in a small
// file (QEMU's x-ignore-shared). A pod's VM is then a clone: the same
// devices, the RAM file mapped private (copy-on-write: the template's
// pages are shared by every clone and never change), the state restored.
// What must differ between clones is set after the restore: the NIC
// (hot-plugged, with the pod interface's MAC: the template has none), the
// network, the clock, the channel (a session of the clone's own), and the
// random seed (q35's vmgenid makes the guest reseed on restore).

// templateVersion is bumped when what a template holds changes.
const templateVersion = "1"

type templates struct {
	k      *kind
	dir    string // templates' records: <dir>/<key>/{state,template.json}
	ramDir string // their RAM files (a tmpfs)

	mu       sync.Mutex
	building map[string]*building
	used     map[string]time.Time // when a pod last asked for each template
}

// pruneGrace keeps a template a pod asked for this recently, whether or
// not its clone maps the RAM file yet.
const pruneGrace = 5 * time.Minute

type building struct {
	done chan struct{}
	t    *vmTemplate
	err  error
}

// vmTemplate is one saved template.
type vmTemplate struct {
	Key       string    `json:"key"`
	StateFile string    `json:"stateFile"`
	RAMFile   string    `json:"ramFile"`
	Image     string    `json:"image"`
	VCPUs     int       `json:"vcpus"`
	MemoryMiB int       `json:"memoryMiB"`
	Created   time.Time `json:"created"`
}

func newTemplates(k *kind, dir, ramDir string) *templates {
	return &templates{k: k, dir: dir, ramDir: ramDir, building: map[string]*building{}, used: map[string]time.Time{}}
}

// templateKey names a template by everything its state depends on, and
// by its scope: the pods that may share it ("" for every pod of the node).
func templateKey(img *guest.Image, cfg hypervisor.Config, scope string) string {
	bin, _ := qemu.FindBinary(cfg.Binary)
	// Files are known by path, size, modification time and inode: a kernel or
	// initramfs replaced at the same path (an image without a manifest
	// key, given by kernel_path and initrd_path) makes a new template.
	fileID := func(path string) string {
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil {
			return path
		}
		return fmt.Sprintf("%s:%d:%d.%d:%d", path, st.Size, st.Mtim.Sec, st.Mtim.Nsec, st.Ino)
	}
	binID := fileID(bin)
	var tags []string
	for _, s := range cfg.Shares {
		tags = append(tags, s.Tag+":"+s.Kind)
	}
	h := sha256.New()
	fmt.Fprintf(h, "v%s\nimage %s %s %s\nqemu %s\nvcpus %d mem %d accel %s tb %d slots %d shares %s\n",
		templateVersion, img.Key, fileID(img.Kernel), fileID(img.Initrd), binID,
		cfg.VCPUs, cfg.MemoryMiB, cfg.Accel, cfg.TBSizeMiB, cfg.HotplugSlots, strings.Join(tags, ","))
	if scope != "" {
		fmt.Fprintf(h, "scope %q\n", scope)
	}
	return hex.EncodeToString(h.Sum(nil))[:24]
}

// get returns the template of cfg's image and size for the pods of scope,
// booting and saving it first if there is none (one build at a time per
// template).
func (ts *templates) get(ctx context.Context, img *guest.Image, cfg hypervisor.Config, scope string) (*vmTemplate, error) {
	key := templateKey(img, cfg, scope)
	ts.mu.Lock()
	ts.used[key] = time.Now()
	ts.mu.Unlock()
	if t, err := ts.load(key); err == nil {
		return t, nil
	}
	ts.mu.Lock()
	b, ok := ts.building[key]
	if !ok {
		b = &building{done: make(chan struct{})}
		ts.building[key] = b
		go func() {
			// Not bound to one pod's request: the template serves them all.
			bctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*ts.k.bootTimeout)
			defer cancel()
			b.t, b.err = ts.build(bctx, key, img, cfg)
			ts.mu.Lock()
			delete(ts.building, key)
			ts.mu.Unlock()
			close(b.done)
		}()
	}
	ts.mu.Unlock()
	select {
	case <-b.done:
		return b.t, b.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (ts *templates) load(key string) (*vmTemplate, error) {
	b, err := os.ReadFile(filepath.Join(ts.dir, key, "template.json"))
	if err != nil {
		return nil, err
	}
	var t vmTemplate
	if err := json.Unmarshal(b, &t); err != nil {
		return nil, err
	}
	for _, f := range []string{t.StateFile, t.RAMFile} {
		if _, err := os.Stat(f); err != nil {
			return nil, err
		}
	}
	return &t, nil
}

// build boots the template VM, waits for its agent (and its modules), and
// saves it.
func (ts *templates) build(ctx context.Context, key string, img *guest.Image, cfg hypervisor.Config) (_ *vmTemplate, retErr error) {
	begin := time.Now()
	dir := filepath.Join(ts.dir, key)
	if err := os.MkdirAll(filepath.Join(dir, "share"), 0o700); err != nil {
		return nil, err
	}
	t := &vmTemplate{
		Key:       key,
		StateFile: filepath.Join(dir, "state"),
		RAMFile:   filepath.Join(ts.ramDir, key+".ram"),
		Image:     img.Key,
		VCPUs:     cfg.VCPUs,
		MemoryMiB: cfg.MemoryMiB,
	}
	defer func() {
		if retErr != nil {
			_ = os.Remove(t.RAMFile)
			_ = os.RemoveAll(dir)
		}
	}()
	cfg.ID = "template-" + key[:12]
	cfg.RunDir = filepath.Join(ts.k.runDirs, "t"+key[:12])
	cfg.Memory = hypervisor.MemoryBackend{Kind: hypervisor.MemoryFile, Path: t.RAMFile, Share: true}
	// The same devices as a clone's, the share a directory of its own (a
	// clone's share is its pod's; the path is not part of the state).
	shares := append([]hypervisor.Share(nil), cfg.Shares...)
	for i := range shares {
		shares[i].Path = filepath.Join(dir, "share")
	}
	cfg.Shares = shares
	launch, st, err := qemu.Driver{}.Prepare(ctx, cfg)
	if err != nil {
		return nil, err
	}
	ref, err := ts.k.spawnVMM(ctx, launch)
	if err != nil {
		return nil, err
	}
	st.Pid, st.StartTime = ref.Pid, ref.StartTime
	// Nobody waits for the template's exit.
	defer ts.k.env.Monitor.Unwatch(ref)
	vm, err := qemu.Attach(ctx, st)
	if err != nil {
		// By the keeper's reference: the run directory is the VM's to
		// write, its pid file says 1 (a PID namespace of its own).
		_ = proc.Signal(ref.Pid, ref.StartTime, unix.SIGKILL)
		return nil, fmt.Errorf("the template VM did not come up (QEMU said %q): %w", qemu.LogTail(st.RunDir, 512), err)
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_ = vm.Stop(sctx)
		_ = vm.Cleanup()
		vm.Close()
	}()
	g := newGuestConn(vm)
	s, err := g.session(ctx)
	if err != nil {
		g.close()
		return nil, fmt.Errorf("the template VM's agent: %w (its console ended with %q)", err, strings.TrimSpace(vm.Console(context.WithoutCancel(ctx), 400)))
	}
	// Saved with every module loaded, so a clone has nothing to wait for.
	for {
		chk, err := s.agent.Check(ctx, &agentapi.CheckRequest{})
		if err != nil {
			g.close()
			return nil, fmt.Errorf("the template VM's agent: %w", err)
		}
		if chk.GetModulesReady() {
			break
		}
		select {
		case <-ctx.Done():
			g.close()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	// The saved guest holds no session: each clone starts its own.
	g.close()
	tmp := t.StateFile + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return nil, err
	}
	err = vm.Save(ctx, f, true)
	if err == nil {
		err = f.Sync()
	}
	f.Close()
	if err != nil {
		_ = os.Remove(tmp)
		return nil, fmt.Errorf("saving the template VM: %w", err)
	}
	if err := os.Rename(tmp, t.StateFile); err != nil {
		return nil, err
	}
	t.Created = time.Now().UTC()
	b, err := json.Marshal(t)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "template.json"), b, 0o600); err != nil {
		return nil, err
	}
	log.G(ctx).WithField("template", key).WithField("vcpus", cfg.VCPUs).WithField("memoryMiB", cfg.MemoryMiB).
		WithField("took", time.Since(begin)).Info("VM template saved")
	go ts.prune(context.WithoutCancel(ctx), key)
	return t, nil
}

// startClone starts the pod's VM as a clone of t.
func (p *pod) startClone(ctx context.Context, cfg hypervisor.Config, t *vmTemplate) error {
	cfg.Memory = hypervisor.MemoryBackend{Kind: hypervisor.MemoryFile, Path: t.RAMFile, Share: false}
	cfg.Incoming = true
	if err := p.spawn(ctx, cfg); err != nil {
		return err
	}
	f, err := os.Open(t.StateFile)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := p.vm.Restore(ctx, f, true); err != nil {
		return err
	}
	p.st.Template = t.Key
	return nil
}

// prune removes the templates other than keep that no VM maps any more
// (their image or size changed, or a newer build replaced them).
func (ts *templates) prune(ctx context.Context, keep string) {
	entries, err := os.ReadDir(ts.dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if e.Name() == keep || !e.IsDir() {
			continue
		}
		t, err := ts.load(e.Name())
		if err != nil {
			continue
		}
		// Checked and removed under the lock: a pod asking for it
		// meanwhile waits, then builds it again.
		ts.mu.Lock()
		if time.Since(ts.used[t.Key]) < pruneGrace {
			ts.mu.Unlock()
			continue
		}
		if mapped, err := fileMapped(t.RAMFile); err != nil || mapped {
			ts.mu.Unlock()
			continue
		}
		log.G(ctx).WithField("template", t.Key).Info("removing a VM template no VM uses")
		_ = os.Remove(t.RAMFile)
		_ = os.RemoveAll(filepath.Join(ts.dir, e.Name()))
		delete(ts.used, t.Key)
		ts.mu.Unlock()
	}
}

// fileMapped reports whether a process of the node maps path.
func fileMapped(path string) (bool, error) {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return false, err
	}
	for _, p := range procs {
		if p.Name()[0] < '0' || p.Name()[0] > '9' {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", p.Name(), "maps"))
		if err != nil {
			continue
		}
		if strings.Contains(string(b), " "+path+"\n") || strings.Contains(string(b), " "+path+" (deleted)") {
			return true, nil
		}
	}
	return false, nil
}

// killVMIn ends the hypervisor of a run directory, by its pid file, if it
// still is the hypervisor of that directory (its command line names the
// directory's control socket).
func killVMIn(ctx context.Context, runDir string) {
	actx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	vm, err := qemu.Attach(actx, qemu.StateIn(runDir))
	if err != nil {
		return // none, or not its QEMU any more
	}
	sctx, cancel2 := context.WithTimeout(ctx, 10*time.Second)
	defer cancel2()
	if err := vm.Stop(sctx); err != nil {
		log.G(ctx).WithError(err).WithField("run", runDir).Warn("ending a VM no record owns")
	}
	vm.Close()
}
