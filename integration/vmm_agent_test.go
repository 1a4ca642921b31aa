//go:build e2e

package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v2stats "github.com/containerd/cgroups/v3/cgroup2/stats"
	taskv3 "github.com/containerd/containerd/api/runtime/task/v3"
	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
)

// TestVMMAgent drives the guest agent's task service the way the
// kuasar-vmm controller will, with no controller: it boots the guest of
// `make guest` with a 9p share, lays container bundles out in the share as
// the host does (a busybox root file system and a config.json in the
// guest-path form), sets the sandbox up, and goes through the task API and
// the agent's stdio calls: lifecycle and exit codes, output written while
// nobody reads, stdin, a terminal with a resize, exec, pids, kill, pause,
// update, stats with an OOM kill, pod stats, and the pod's shared PID, IPC
// and UTS namespaces. It prints the guest's create+start latency.
func TestVMMAgent(t *testing.T) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skipf("skipping the microVM agent test: qemu-system-x86_64 is not installed: %v", err)
	}
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatalf("busybox (Debian busybox-static, make deps) is needed for the containers' root file system: %v", err)
	}
	img := guestImage(t)
	accel, err := hypervisor.ResolveAccel("auto", hypervisor.KVMUsable())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	cfg := vmConfig(t, img, accel, envInt("KUASAR_VMM_MEMORY_MIB", 128), envInt("KUASAR_VMM_TB_MIB", 64))
	if lvl := os.Getenv("KUASAR_VMM_AGENT_LOG"); lvl != "" {
		cfg.KernelArgs = append(cfg.KernelArgs, guest.ParamLogLevel+"="+lvl)
	}
	b := spawnVM(ctx, t, cfg)
	b.dialAgent(ctx, t)
	pod := &agentPod{t: t, b: b, share: cfg.Shares[0].Path, busybox: busybox, tasks: taskv3.NewTTRPCTaskClient(b.client)}
	logged := false
	showLogs := func() {
		if (t.Failed() || os.Getenv("KUASAR_VMM_AGENT_LOG") != "") && !logged {
			logged = true
			t.Logf("guest console:%s", b.logs())
		}
	}
	t.Cleanup(showLogs)

	// A task call before the sandbox is set up is refused.
	pod.bundle("early", []string{"true"}, nil)
	_, err = pod.tasks.Create(ctx, &taskv3.CreateTaskRequest{ID: "early", Bundle: guest.BundleDir("early"), Stdout: "o"})
	if !errdefs.IsFailedPrecondition(errgrpc.ToNative(err)) {
		t.Errorf("Create before SetupSandbox: %v, want failed precondition", err)
	}

	setup := &agentapi.SetupSandboxRequest{
		SandboxId: "vmpod", Hostname: "vm-pod-host", SharePid: true, ShmSizeBytes: 16 << 20,
		ShareTag: guest.ShareTag, ShareType: "9p",
		Sysctls: map[string]string{"kernel.shm_rmid_forced": "1", "net.ipv4.ip_unprivileged_port_start": "80"},
	}
	free := func() uint64 {
		c, err := b.agent.Check(ctx, &agentapi.CheckRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return c.MemAvailableBytes >> 20
	}
	before := free()
	start := time.Now()
	if _, err := b.agent.SetupSandbox(ctx, setup); err != nil {
		t.Fatalf("SetupSandbox: %v%s", err, b.logs())
	}
	t.Logf("SetupSandbox (share, namespaces, pod PID init, /dev/shm, sysctls): %v; guest memory available %d MiB before, %d MiB after", time.Since(start).Round(time.Millisecond), before, free())
	// Again, as after a daemon restart: what exists is kept.
	if _, err := b.agent.SetupSandbox(ctx, setup); err != nil {
		t.Fatalf("second SetupSandbox: %v", err)
	}

	t.Run("lifecycle", func(t *testing.T) {
		pod.t = t
		var lat []time.Duration
		for i := range 3 {
			id := fmt.Sprintf("hello%d", i)
			pod.bundle(id, []string{"sh", "-c", "echo hello from $(hostname); cat /proc/sys/kernel/shm_rmid_forced /proc/sys/net/ipv4/ip_unprivileged_port_start; echo oops >&2; exit 7"}, nil)
			begin := time.Now()
			pod.create(ctx, &taskv3.CreateTaskRequest{ID: id, Stdout: "o", Stderr: "e"})
			pod.start(ctx, id, "")
			lat = append(lat, time.Since(begin))
			out, errOut := pod.readAll(ctx, id, "", agentapi.Stream_STDOUT), pod.readAll(ctx, id, "", agentapi.Stream_STDERR)
			if st := pod.wait(ctx, id, ""); st != 7 {
				t.Errorf("exit status %d, want 7", st)
			}
			if want := "hello from vm-pod-host\n1\n80\n"; string(out) != want || string(errOut) != "oops\n" {
				t.Errorf("stdout %q (want %q), stderr %q", out, want, errOut)
			}
			pod.delete(ctx, id, "")
		}
		t.Logf("container create+start in the guest (task API over the channel, %s): %v", accel, lat)
		// A deleted container's streams are gone.
		_, err := b.agent.ReadStdio(ctx, &agentapi.ReadStdioRequest{Process: &agentapi.ProcessStdio{ContainerId: "hello0"}})
		if !errdefs.IsNotFound(errgrpc.ToNative(err)) {
			t.Errorf("ReadStdio of a deleted container: %v", err)
		}
	})

	t.Run("output kept while nobody reads", func(t *testing.T) {
		pod.t = t
		// About 2.3 MB: twice the agent's buffer and more.
		const lines = 330000
		pod.bundle("chatty", []string{"seq", "1", strconv.Itoa(lines)}, nil)
		pod.create(ctx, &taskv3.CreateTaskRequest{ID: "chatty", Stdout: "o"})
		pod.start(ctx, "chatty", "")
		// Nobody reads for a while: the process must block, not lose output.
		time.Sleep(5 * time.Second)
		st, err := pod.tasks.State(ctx, &taskv3.StateRequest{ID: "chatty"})
		if err != nil {
			t.Fatal(err)
		}
		if st.Status != tasktypes.Status_RUNNING {
			t.Errorf("a writer nobody reads is %s, want running (blocked on its full stream)", st.Status)
		}
		// Read some, then the daemon "restarts" (a new channel session):
		// what was read but not acknowledged is still there, and the rest
		// follows.
		var out []byte
		off, last := pod.readFrom(ctx, "chatty", "", agentapi.Stream_STDOUT, 0, func(b []byte) bool {
			out = append(out, b...)
			return len(out) > 600<<10
		})
		pod.reconnect(ctx)
		again := off - uint64(min(last, 100))
		r, err := b.agent.ReadStdio(ctx, &agentapi.ReadStdioRequest{Process: &agentapi.ProcessStdio{ContainerId: "chatty"}, Offset: again, MaxBytes: 100})
		if err != nil || r.Offset != again || !bytes.Equal(r.Data, out[again:off]) {
			t.Errorf("re-reading unacknowledged output after a reconnect: offset %d (asked %d), %d bytes, %v", r.GetOffset(), again, len(r.GetData()), err)
		}
		pod.readFrom(ctx, "chatty", "", agentapi.Stream_STDOUT, off, func(b []byte) bool { out = append(out, b...); return false })
		var want bytes.Buffer
		for i := 1; i <= lines; i++ {
			fmt.Fprintf(&want, "%d\n", i)
		}
		if !bytes.Equal(out, want.Bytes()) {
			t.Errorf("read %d bytes, want %d (all of seq's output, in order)", len(out), want.Len())
		}
		if st := pod.wait(ctx, "chatty", ""); st != 0 {
			t.Errorf("exit status %d", st)
		}
		pod.delete(ctx, "chatty", "")
		t.Logf("%d bytes written while nobody read, all delivered (across a new channel session)", len(out))
	})

	t.Run("stdin", func(t *testing.T) {
		pod.t = t
		pod.bundle("cat", []string{"cat"}, nil)
		pod.create(ctx, &taskv3.CreateTaskRequest{ID: "cat", Stdin: "i", Stdout: "o"})
		pod.start(ctx, "cat", "")
		proc := &agentapi.ProcessStdio{ContainerId: "cat"}
		for _, s := range []string{"to cat\n", "and more\n"} {
			if _, err := b.agent.WriteStdin(ctx, &agentapi.WriteStdinRequest{Process: proc, Data: []byte(s)}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := pod.tasks.CloseIO(ctx, &taskv3.CloseIORequest{ID: "cat", Stdin: true}); err != nil {
			t.Fatal(err)
		}
		if _, err := b.agent.WriteStdin(ctx, &agentapi.WriteStdinRequest{Process: proc, Data: []byte("late")}); !errdefs.IsFailedPrecondition(errgrpc.ToNative(err)) {
			t.Errorf("WriteStdin after CloseIO: %v", err)
		}
		if out := pod.readAll(ctx, "cat", "", agentapi.Stream_STDOUT); string(out) != "to cat\nand more\n" {
			t.Errorf("cat wrote %q", out)
		}
		if st := pod.wait(ctx, "cat", ""); st != 0 {
			t.Errorf("exit status %d", st)
		}
		pod.delete(ctx, "cat", "")
	})

	t.Run("terminal", func(t *testing.T) {
		pod.t = t
		pod.bundle("tty", []string{"sh", "-c", "read x; stty size; echo got $x; tty"}, nil)
		pod.create(ctx, &taskv3.CreateTaskRequest{ID: "tty", Stdin: "i", Stdout: "o", Terminal: true})
		pod.start(ctx, "tty", "")
		if _, err := pod.tasks.ResizePty(ctx, &taskv3.ResizePtyRequest{ID: "tty", Width: 100, Height: 40}); err != nil {
			t.Fatal(err)
		}
		proc := &agentapi.ProcessStdio{ContainerId: "tty"}
		if _, err := b.agent.WriteStdin(ctx, &agentapi.WriteStdinRequest{Process: proc, Data: []byte("go\n")}); err != nil {
			t.Fatal(err)
		}
		out := string(pod.readAll(ctx, "tty", "", agentapi.Stream_STDOUT))
		if !strings.Contains(out, "40 100") || !strings.Contains(out, "got go") || !strings.Contains(out, "/dev/pts/") {
			t.Errorf("terminal output %q: want the size 40 100, the input and a /dev/pts terminal", out)
		}
		if _, err := b.agent.ReadStdio(ctx, &agentapi.ReadStdioRequest{Process: proc, Stream: agentapi.Stream_STDERR}); !errdefs.IsInvalidArgument(errgrpc.ToNative(err)) {
			t.Errorf("ReadStdio of STDERR with a terminal: %v", err)
		}
		if st := pod.wait(ctx, "tty", ""); st != 0 {
			t.Errorf("exit status %d", st)
		}
		pod.delete(ctx, "tty", "")
	})

	t.Run("pod namespaces, exec, pids, pause, update, kill", func(t *testing.T) {
		pod.t = t
		shared := func(o *specOpts) { o.sharePID = true }
		pod.bundle("a", []string{"sh", "-c", "echo shared-shm > /dev/shm/a; echo ready; exec sleep 1000"}, shared)
		pod.create(ctx, &taskv3.CreateTaskRequest{ID: "a", Stdout: "o"})
		pod.start(ctx, "a", "")
		if out := pod.readUntil(ctx, "a", "", "ready\n"); !strings.Contains(out, "ready") {
			t.Fatalf("a: %q", out)
		}
		pod.bundle("b", []string{"sh", "-c", "ps -o pid,args; cat /dev/shm/a; hostname; for n in ipc uts pid; do readlink /proc/self/ns/$n; done"}, shared)
		pod.create(ctx, &taskv3.CreateTaskRequest{ID: "b", Stdout: "o", Stderr: "e"})
		pod.start(ctx, "b", "")
		bOut := string(pod.readAll(ctx, "b", "", agentapi.Stream_STDOUT))
		if st := pod.wait(ctx, "b", ""); st != 0 {
			t.Errorf("b exited %d: %q %q", st, bOut, pod.readAll(ctx, "b", "", agentapi.Stream_STDERR))
		}
		if !strings.Contains(bOut, "sleep 1000") || !strings.Contains(bOut, "pause") || !strings.Contains(bOut, "shared-shm") || !strings.Contains(bOut, "vm-pod-host") {
			t.Errorf("b sees %q: want a's sleep and the pod's init in its PID namespace, a's /dev/shm file, the pod's hostname", bOut)
		}
		pod.delete(ctx, "b", "")

		// An exec in a: same IPC, UTS and PID namespaces as b's.
		out, st := pod.exec(ctx, "a", "ns", []string{"sh", "-c", "for n in ipc uts pid; do readlink /proc/self/ns/$n; done"})
		if st != 0 || !strings.Contains(bOut, strings.TrimSpace(out)) {
			t.Errorf("exec in a: %q (status %d), b had %q", out, st, bOut)
		}
		if out, st := pod.exec(ctx, "a", "fail", []string{"sh", "-c", "echo exec-out; exit 3"}); st != 3 || out != "exec-out\n" {
			t.Errorf("exec: %q, status %d", out, st)
		}

		// An exec with a terminal (crictl exec -it), resized.
		pod.execStart(ctx, "a", "tty", []string{"sh", "-c", "read x; stty size; tty"}, true)
		if _, err := pod.tasks.ResizePty(ctx, &taskv3.ResizePtyRequest{ID: "a", ExecID: "tty", Width: 120, Height: 30}); err != nil {
			t.Fatal(err)
		}
		if _, err := b.agent.WriteStdin(ctx, &agentapi.WriteStdinRequest{Process: &agentapi.ProcessStdio{ContainerId: "a", ExecId: "tty"}, Data: []byte("\n")}); err != nil {
			t.Fatal(err)
		}
		if out := string(pod.readAll(ctx, "a", "tty", agentapi.Stream_STDOUT)); !strings.Contains(out, "30 120") || !strings.Contains(out, "/dev/pts/") {
			t.Errorf("exec with a terminal: %q", out)
		}
		if st := pod.wait(ctx, "a", "tty"); st != 0 {
			t.Errorf("exec with a terminal: status %d", st)
		}
		pod.delete(ctx, "a", "tty")

		// A long exec: Pids lists it, marked; killed alone, it ends alone.
		pod.execStart(ctx, "a", "long", []string{"sleep", "500"}, false)
		ps, err := pod.tasks.Pids(ctx, &taskv3.PidsRequest{ID: "a"})
		if err != nil {
			t.Fatal(err)
		}
		execs := 0
		for _, p := range ps.Processes {
			if p.Info != nil {
				execs++
			}
		}
		if len(ps.Processes) != 2 || execs != 1 {
			t.Errorf("Pids: %v, want a's sleep and the exec", ps.Processes)
		}
		if _, err := pod.tasks.Kill(ctx, &taskv3.KillRequest{ID: "a", ExecID: "long", Signal: 9}); err != nil {
			t.Fatal(err)
		}
		if st := pod.wait(ctx, "a", "long"); st != 137 {
			t.Errorf("killed exec: status %d", st)
		}
		pod.delete(ctx, "a", "long")

		// Pause and resume (the cgroup v2 freezer, through runc).
		if _, err := pod.tasks.Pause(ctx, &taskv3.PauseRequest{ID: "a"}); err != nil {
			t.Fatal(err)
		}
		if st := pod.state(ctx, "a"); st != tasktypes.Status_PAUSED {
			t.Errorf("paused: %s", st)
		}
		if _, err := pod.tasks.Resume(ctx, &taskv3.ResumeRequest{ID: "a"}); err != nil {
			t.Fatal(err)
		}
		if st := pod.state(ctx, "a"); st != tasktypes.Status_RUNNING {
			t.Errorf("resumed: %s", st)
		}

		// Update the memory limit and see it in Stats.
		limit := int64(48 << 20)
		res, _ := json.Marshal(&specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}})
		if _, err := pod.tasks.Update(ctx, &taskv3.UpdateTaskRequest{ID: "a", Resources: &anypb.Any{
			TypeUrl: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources", Value: res}}); err != nil {
			t.Fatal(err)
		}
		if m := pod.stats(ctx, "a"); m.Memory == nil || m.Memory.UsageLimit != uint64(limit) || m.Pids == nil || m.Pids.Current == 0 {
			t.Errorf("stats after Update: %v", m)
		}
		pm := pod.podStats(ctx)
		if pm.Memory == nil || pm.Memory.Usage == 0 || pm.CPU == nil || pm.CPU.UsageUsec == 0 {
			t.Errorf("pod stats: %v", pm)
		}

		// A container with a PID namespace of its own.
		pod.bundle("own", []string{"sh", "-c", "echo $$; ps -o pid | wc -l"}, nil)
		pod.create(ctx, &taskv3.CreateTaskRequest{ID: "own", Stdout: "o"})
		pod.start(ctx, "own", "")
		if out := string(pod.readAll(ctx, "own", "", agentapi.Stream_STDOUT)); !strings.HasPrefix(out, "1\n") {
			t.Errorf("own PID namespace: %q, want pid 1", out)
		}
		pod.wait(ctx, "own", "")
		pod.delete(ctx, "own", "")

		if _, err := pod.tasks.Kill(ctx, &taskv3.KillRequest{ID: "a", Signal: 9, All: true}); err != nil {
			t.Fatal(err)
		}
		if st := pod.wait(ctx, "a", ""); st != 137 {
			t.Errorf("a killed: status %d", st)
		}
		pod.delete(ctx, "a", "")
	})

	t.Run("oom", func(t *testing.T) {
		pod.t = t
		pod.bundle("hog", []string{"tail", "/dev/zero"}, func(o *specOpts) { o.memory = 16 << 20 })
		pod.create(ctx, &taskv3.CreateTaskRequest{ID: "hog", Stdout: "o"})
		pod.start(ctx, "hog", "")
		if st := pod.wait(ctx, "hog", ""); st != 137 {
			t.Errorf("a memory hog exited %d, want 137", st)
		}
		m := pod.stats(ctx, "hog")
		if m.MemoryEvents == nil || m.MemoryEvents.OomKill == 0 {
			t.Errorf("stats after the OOM kill: memory events %v", m.MemoryEvents)
		}
		pod.delete(ctx, "hog", "")
		if _, err := pod.tasks.Stats(ctx, &taskv3.StatsRequest{ID: "hog"}); !errdefs.IsNotFound(errgrpc.ToNative(err)) {
			t.Errorf("Stats after Delete: %v", err)
		}
	})

	t.Run("bad input", func(t *testing.T) {
		pod.t = t
		_, err := pod.tasks.Create(ctx, &taskv3.CreateTaskRequest{ID: "nobundle", Bundle: guest.BundleDir("nobundle"), Stdout: "o"})
		if err == nil {
			t.Error("Create without a bundle succeeded")
		}
		pod.bundle("norootfs", []string{"true"}, nil)
		os.RemoveAll(filepath.Join(pod.share, "norootfs", "rootfs"))
		_, err = pod.tasks.Create(ctx, &taskv3.CreateTaskRequest{ID: "norootfs", Bundle: guest.BundleDir("norootfs"), Stdout: "o"})
		if !errdefs.IsFailedPrecondition(errgrpc.ToNative(err)) {
			t.Errorf("Create without a rootfs: %v", err)
		}
		// runc checks the command at create; nothing is left of a failed one.
		pod.bundle("noexec", []string{"/no/such/binary"}, nil)
		_, err = pod.tasks.Create(ctx, &taskv3.CreateTaskRequest{ID: "noexec", Bundle: guest.BundleDir("noexec"), Stdout: "o"})
		if !errdefs.IsFailedPrecondition(errgrpc.ToNative(err)) || !strings.Contains(err.Error(), "/no/such/binary") {
			t.Errorf("Create with a missing command: %v", err)
		}
		pod.bundle("noexec", []string{"true"}, nil)
		pod.create(ctx, &taskv3.CreateTaskRequest{ID: "noexec", Stdout: "o"})
		pod.start(ctx, "noexec", "")
		pod.wait(ctx, "noexec", "")
		pod.delete(ctx, "noexec", "")
		if _, err := b.agent.ReadStdio(ctx, &agentapi.ReadStdioRequest{}); !errdefs.IsInvalidArgument(errgrpc.ToNative(err)) {
			t.Errorf("ReadStdio without a process: %v", err)
		}
		if _, err := b.agent.SetupSandbox(ctx, &agentapi.SetupSandboxRequest{SandboxId: "other"}); !errdefs.IsAlreadyExists(errgrpc.ToNative(err)) {
			t.Errorf("SetupSandbox for another sandbox: %v", err)
		}
	})

	t.Run("nothing left in the guest", func(t *testing.T) {
		pod.t = t
		// A last container looks at the agent's state and the containers'
		// cgroups (bind mounts of guest paths, for the test only).
		pod.bundle("inspect", []string{"sh", "-c", "cd /agent && ls -A bundles runc tasks console; ls /kuasar-cg | grep -v '[.]'"}, func(o *specOpts) {
			o.binds = map[string]string{"/run/kuasar/agent": "/agent", "/sys/fs/cgroup" + guest.CgroupParent: "/kuasar-cg"}
		})
		pod.create(ctx, &taskv3.CreateTaskRequest{ID: "inspect", Stdout: "o", Stderr: "e"})
		pod.start(ctx, "inspect", "")
		out := string(pod.readAll(ctx, "inspect", "", agentapi.Stream_STDOUT))
		if st := pod.wait(ctx, "inspect", ""); st != 0 {
			t.Fatalf("inspect: %d %q %q", st, out, pod.readAll(ctx, "inspect", "", agentapi.Stream_STDERR))
		}
		// ls's sections, then the cgroups under guest.CgroupParent.
		want := "bundles:\ninspect\n\nconsole:\n\nrunc:\ninspect\n\ntasks:\ninspect.json\ninspect\n"
		if out != want {
			t.Errorf("left in the guest after every other container was deleted:\n%s\nwant:\n%s", out, want)
		}
		pod.delete(ctx, "inspect", "")
	})

	pod.t = t
	showLogs()
	if _, err := b.agent.Shutdown(ctx, &agentapi.ShutdownRequest{}); err != nil {
		t.Fatal(err)
	}
	if err := b.vm.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	b.cleanupAndCheck(t)
}

// agentPod is the test's pod: a VM, its share and its task service.
type agentPod struct {
	t       *testing.T
	b       *bootedVM
	share   string
	busybox string
	tasks   taskv3.TTRPCTaskService
}

// specOpts are the test's variations of a container spec.
type specOpts struct {
	sharePID bool
	memory   int64
	// binds are guest paths bound into the container (source: target).
	binds map[string]string
}

// bundle lays a container out in the share as the host does: a root file
// system (busybox and its applets) and config.json with guest paths.
func (p *agentPod) bundle(id string, args []string, opt func(*specOpts)) {
	t := p.t
	t.Helper()
	var o specOpts
	if opt != nil {
		opt(&o)
	}
	dir := filepath.Join(p.share, id)
	rootfs := filepath.Join(dir, "rootfs")
	for _, d := range []string{"bin", "proc", "sys", "dev", "tmp", "etc"} {
		if err := os.MkdirAll(filepath.Join(rootfs, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bb := filepath.Join(rootfs, "bin", "busybox")
	if _, err := os.Stat(bb); err != nil {
		data, err := os.ReadFile(p.busybox)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(bb, data, 0o755); err != nil {
			t.Fatal(err)
		}
		list, err := exec.Command(p.busybox, "--list").Output()
		if err != nil {
			t.Fatal(err)
		}
		for _, applet := range strings.Fields(string(list)) {
			if applet != "busybox" {
				os.Symlink("busybox", filepath.Join(rootfs, "bin", applet))
			}
		}
	}
	ns := []specs.LinuxNamespace{
		{Type: specs.MountNamespace}, {Type: specs.CgroupNamespace},
		{Type: specs.IPCNamespace, Path: guest.PodNSDir + "/ipc"},
		{Type: specs.UTSNamespace, Path: guest.PodNSDir + "/uts"},
		{Type: specs.PIDNamespace},
	}
	if o.sharePID {
		ns[4].Path = guest.PodNSDir + "/pid"
	}
	spec := &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{
			Args: args, Cwd: "/", Env: []string{"PATH=/bin"},
			Capabilities: &specs.LinuxCapabilities{
				Bounding:  []string{"CAP_KILL", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"},
				Effective: []string{"CAP_KILL", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"},
				Permitted: []string{"CAP_KILL", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"},
			},
		},
		Root: &specs.Root{Path: guest.BundleDir(id) + "/rootfs"},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}},
			{Destination: "/dev/shm", Type: "bind", Source: guest.PodShmDir, Options: []string{"rbind", "rw"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
		},
		Linux: &specs.Linux{
			Namespaces:  ns,
			CgroupsPath: guest.CgroupParent + "/" + id,
			Resources:   &specs.LinuxResources{},
		},
	}
	for src, dst := range o.binds {
		spec.Mounts = append(spec.Mounts, specs.Mount{Destination: dst, Type: "bind", Source: src, Options: []string{"rbind", "ro"}})
	}
	if o.memory > 0 {
		swap := o.memory
		spec.Linux.Resources.Memory = &specs.LinuxMemory{Limit: &o.memory, Swap: &swap}
	}
	data, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func (p *agentPod) create(ctx context.Context, r *taskv3.CreateTaskRequest) {
	p.t.Helper()
	r.Bundle = guest.BundleDir(r.ID)
	if _, err := p.tasks.Create(ctx, r); err != nil {
		p.t.Fatalf("Create %s: %v", r.ID, err)
	}
}

func (p *agentPod) start(ctx context.Context, id, execID string) {
	p.t.Helper()
	if _, err := p.tasks.Start(ctx, &taskv3.StartRequest{ID: id, ExecID: execID}); err != nil {
		p.t.Fatalf("Start %s %s: %v", id, execID, err)
	}
}

func (p *agentPod) wait(ctx context.Context, id, execID string) uint32 {
	p.t.Helper()
	r, err := p.tasks.Wait(ctx, &taskv3.WaitRequest{ID: id, ExecID: execID})
	if err != nil {
		p.t.Fatalf("Wait %s %s: %v", id, execID, err)
	}
	return r.ExitStatus
}

func (p *agentPod) delete(ctx context.Context, id, execID string) {
	p.t.Helper()
	if _, err := p.tasks.Delete(ctx, &taskv3.DeleteRequest{ID: id, ExecID: execID}); err != nil {
		p.t.Fatalf("Delete %s %s: %v", id, execID, err)
	}
}

func (p *agentPod) state(ctx context.Context, id string) tasktypes.Status {
	p.t.Helper()
	st, err := p.tasks.State(ctx, &taskv3.StateRequest{ID: id})
	if err != nil {
		p.t.Fatal(err)
	}
	return st.Status
}

// execStart adds and starts an exec (its stdout captured; with a
// terminal, its stdin too).
func (p *agentPod) execStart(ctx context.Context, id, execID string, args []string, terminal bool) {
	p.t.Helper()
	spec, _ := json.Marshal(&specs.Process{Args: args, Cwd: "/", Env: []string{"PATH=/bin"}, Terminal: terminal})
	stdin := ""
	if terminal {
		stdin = "i"
	}
	if _, err := p.tasks.Exec(ctx, &taskv3.ExecProcessRequest{ID: id, ExecID: execID, Stdin: stdin, Stdout: "o", Terminal: terminal,
		Spec: &anypb.Any{TypeUrl: "types.containerd.io/opencontainers/runtime-spec/1/Process", Value: spec}}); err != nil {
		p.t.Fatalf("Exec %s: %v", execID, err)
	}
	p.start(ctx, id, execID)
}

// exec runs a command in a container and returns its output and status.
func (p *agentPod) exec(ctx context.Context, id, execID string, args []string) (string, uint32) {
	p.t.Helper()
	p.execStart(ctx, id, execID, args, false)
	out := p.readAll(ctx, id, execID, agentapi.Stream_STDOUT)
	st := p.wait(ctx, id, execID)
	p.delete(ctx, id, execID)
	return string(out), st
}

// readAll reads a stream to its end, the way the host does: by offset,
// acknowledging what it got with the next call.
func (p *agentPod) readAll(ctx context.Context, id, execID string, s agentapi.Stream) []byte {
	p.t.Helper()
	var out []byte
	p.read(ctx, id, execID, s, func(b []byte) bool { out = append(out, b...); return false })
	return out
}

// readUntil reads a stream until what was read contains want.
func (p *agentPod) readUntil(ctx context.Context, id, execID, want string) string {
	p.t.Helper()
	var out []byte
	p.read(ctx, id, execID, agentapi.Stream_STDOUT, func(b []byte) bool {
		out = append(out, b...)
		return bytes.Contains(out, []byte(want))
	})
	return string(out)
}

func (p *agentPod) read(ctx context.Context, id, execID string, s agentapi.Stream, done func([]byte) bool) {
	p.t.Helper()
	p.readFrom(ctx, id, execID, s, 0, done)
}

// readFrom reads from off until done says so or the stream ends, and
// returns the offset reached and the size of the last chunk (read, but
// not acknowledged yet).
func (p *agentPod) readFrom(ctx context.Context, id, execID string, s agentapi.Stream, off uint64, done func([]byte) bool) (uint64, int) {
	p.t.Helper()
	for {
		r, err := p.b.agent.ReadStdio(ctx, &agentapi.ReadStdioRequest{
			Process: &agentapi.ProcessStdio{ContainerId: id, ExecId: execID}, Stream: s, Offset: off, WaitMs: 2000, MaxBytes: 256 << 10,
		})
		if err != nil {
			p.t.Fatalf("ReadStdio %s %s %s at %d: %v", id, execID, s, off, err)
		}
		if r.Offset != off {
			p.t.Fatalf("ReadStdio %s %s: offset %d, asked %d: output lost", id, execID, r.Offset, off)
		}
		off += uint64(len(r.Data))
		if done(r.Data) || r.Eof {
			return off, len(r.Data)
		}
	}
}

// reconnect does what a restarted daemon does: a new channel session, new
// clients.
func (p *agentPod) reconnect(ctx context.Context) {
	p.t.Helper()
	p.b.client.Close()
	conn, err := p.b.vm.DialAgent(ctx)
	if err != nil {
		p.t.Fatalf("reconnecting: %v", err)
	}
	p.b.connect(conn)
	p.tasks = taskv3.NewTTRPCTaskClient(p.b.client)
}

func (p *agentPod) stats(ctx context.Context, id string) *v2stats.Metrics {
	p.t.Helper()
	r, err := p.tasks.Stats(ctx, &taskv3.StatsRequest{ID: id})
	if err != nil {
		p.t.Fatalf("Stats %s: %v", id, err)
	}
	return p.metrics(r.Stats)
}

func (p *agentPod) podStats(ctx context.Context) *v2stats.Metrics {
	p.t.Helper()
	r, err := p.b.agent.PodStats(ctx, &emptypb.Empty{})
	if err != nil {
		p.t.Fatalf("PodStats: %v", err)
	}
	return p.metrics(r.Metrics)
}

func (p *agentPod) metrics(a *anypb.Any) *v2stats.Metrics {
	p.t.Helper()
	v, err := typeurl.UnmarshalAny(a)
	if err != nil {
		p.t.Fatal(err)
	}
	m, ok := v.(*v2stats.Metrics)
	if !ok {
		p.t.Fatalf("metrics of type %T, want cgroup v2 metrics", v)
	}
	return m
}
