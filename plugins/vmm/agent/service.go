package agent

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	taskv3 "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/kuasar-io/containerd-kuasar/plugins/task"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agent/reaper"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
)

// register puts every service of the agent on its ttrpc server: the
// Agent service and the containerd task service (containerd.task.v3.Task)
// of the pod's containers.
func register(srv *ttrpc.Server, a *agent) {
	agentapi.RegisterAgentService(srv, a)
	taskv3.RegisterTTRPCTaskService(srv, taskService{a.tasks, a.pod})
}

// taskService is the task service of the pod's containers. It refuses a
// container before SetupSandbox: its bundle would not be there.
type taskService struct {
	*task.Service
	pod *pod
}

func (s taskService) Create(ctx context.Context, r *taskv3.CreateTaskRequest) (*taskv3.CreateTaskResponse, error) {
	if _, err := s.pod.specNamespaces(); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return s.Service.Create(ctx, r)
}

// agent is the state of the guest agent shared by its services.
type agent struct {
	version   string
	revision  string
	startedAt time.Time
	bootID    string
	release   string
	imageKey  string
	mods      *modules
	reaper    *reaper.Reaper
	runc      *runcBinary
	// pod is what SetupSandbox made; ctrs runs the containers the task
	// service (tasks) serves.
	pod   *pod
	ctrs  *containers
	tasks *task.Service
	// powerOff ends the guest; called after Shutdown's reply is sent.
	powerOff func(reboot bool)
	// setClock sets the guest's wall clock.
	setClock func(time.Time) error
}

var _ agentapi.AgentService = (*agent)(nil)

// stateDir holds the agent's own state on the guest's /run tmpfs: the task
// records, runc's state, the guest bundles, console sockets.
const stateDir = "/run/kuasar/agent"

// taskNamespace is the containerd namespace of tasks whose calls carry
// none (the host's calls carry theirs).
const taskNamespace = "k8s.io"

func newAgent(ctx context.Context, cfg Config, mods *modules, r *reaper.Reaper) (*agent, error) {
	a := &agent{
		version: cfg.Version, revision: cfg.Revision, startedAt: cfg.Started, mods: mods, reaper: r, runc: cfg.runc,
		powerOff: func(reboot bool) { powerOff(ctx, reboot) },
		setClock: setClock,
	}
	dir := cfg.stateDir
	if dir == "" {
		dir = stateDir
	}
	if a.runc == nil {
		a.runc = plainRunc(guest.RuncPath)
	}
	a.pod = newPod(r)
	a.ctrs = newContainers(r, a.pod, a.runc, dir)
	tasks, err := task.NewService("guest", taskNamespace, filepath.Join(dir, "tasks"), a.ctrs, nil, nil)
	if err != nil {
		return nil, err
	}
	a.tasks = tasks
	if b, err := os.ReadFile("/proc/sys/kernel/random/boot_id"); err == nil {
		a.bootID = strings.TrimSpace(string(b))
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		a.release = unix.ByteSliceToString(u.Release[:])
	}
	if b, err := os.ReadFile(guest.ImageInfoPath); err == nil {
		var m struct {
			Key string `json:"key"`
		}
		if json.Unmarshal(b, &m) == nil {
			a.imageKey = m.Key
		}
	}
	return a, nil
}

// channelHello is what the agent says on its channel while it has no
// session.
func (a *agent) channelHello() []byte {
	return agentapi.ChannelHello{Protocol: agentapi.ProtocolVersion, Agent: a.version, BootID: a.bootID, ImageKey: a.imageKey}.Marshal()
}

func (a *agent) Hello(ctx context.Context, req *agentapi.HelloRequest) (*agentapi.HelloResponse, error) {
	return &agentapi.HelloResponse{
		Version:       agentapi.ProtocolVersion,
		AgentVersion:  a.version,
		AgentRevision: a.revision,
		BootId:        a.bootID,
		KernelRelease: a.release,
		ImageKey:      a.imageKey,
		StartedAt:     timestamppb.New(a.startedAt),
	}, nil
}

func (a *agent) Check(ctx context.Context, req *agentapi.CheckRequest) (*agentapi.CheckResponse, error) {
	resp := &agentapi.CheckResponse{Now: timestamppb.Now()}
	resp.ModulesReady, resp.ModuleErrors = a.mods.status()
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) == nil {
		resp.UptimeNs = uint64(ts.Nano())
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		resp.MemTotalBytes, resp.MemAvailableBytes = parseMeminfo(b)
	}
	if req.Runtime {
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		bin, err := a.runc.Path(ctx)
		if err != nil {
			return nil, err
		}
		cmd := exec.CommandContext(ctx, bin, "--version")
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := a.reaper.Exec(cmd); err != nil {
			return nil, fmt.Errorf("runc (%s) --version: %v: %s: %w", bin, err, strings.TrimSpace(out.String()), errdefs.ErrFailedPrecondition)
		}
		resp.RuntimeVersion = strings.TrimSpace(out.String())
	}
	return resp, nil
}

func (a *agent) SyncClock(ctx context.Context, req *agentapi.SyncClockRequest) (*agentapi.SyncClockResponse, error) {
	now := time.Now()
	if req.HostTime == nil || !req.HostTime.IsValid() {
		return nil, fmt.Errorf("no valid host_time: %w", errdefs.ErrInvalidArgument)
	}
	if err := a.setClock(req.HostTime.AsTime()); err != nil {
		return nil, fmt.Errorf("setting the clock: %w", err)
	}
	log.G(ctx).WithField("offset", req.HostTime.AsTime().Sub(now)).Debug("clock set from the host")
	return &agentapi.SyncClockResponse{GuestTime: timestamppb.New(now)}, nil
}

// shutdownDelay lets Shutdown's reply leave before the guest goes.
const shutdownDelay = 100 * time.Millisecond

func (a *agent) Shutdown(ctx context.Context, req *agentapi.ShutdownRequest) (*emptypb.Empty, error) {
	log.G(ctx).WithField("reboot", req.Reboot).Info("shutdown requested")
	reboot := req.Reboot
	time.AfterFunc(shutdownDelay, func() {
		_ = unix.Kill(-1, unix.SIGKILL) // every process but PID 1
		a.powerOff(reboot)
	})
	return &emptypb.Empty{}, nil
}

func setClock(t time.Time) error {
	ts := unix.NsecToTimespec(t.UnixNano())
	return unix.ClockSettime(unix.CLOCK_REALTIME, &ts)
}

// parseMeminfo returns MemTotal and MemAvailable in bytes.
func parseMeminfo(b []byte) (total, avail uint64) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		v, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			continue
		}
		if len(f) > 2 && f[2] == "kB" {
			v *= 1024
		}
		switch f[0] {
		case "MemTotal:":
			total = v
		case "MemAvailable:":
			avail = v
		}
	}
	return total, avail
}

func timestamp(t time.Time) *timestamppb.Timestamp { return timestamppb.New(t) }
