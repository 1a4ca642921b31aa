//go:build bench

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// The benchmark compares, in one run on one machine, stock containerd
// (podsandbox, containerd-shim-runc-v2, pause) with containerd-kuasar's
// kuasar-runc, both built from the same containerd release with the same
// flags, driven from this one Go CRI client. It reports ratios; it never
// fails on speed.

type target struct {
	Name    string
	Handler string
	d       *Daemon
	pods    []string
	phases  map[string][]time.Duration
}

// Latencies summarises a set of durations (milliseconds).
type Latencies struct {
	N      int     `json:"n"`
	P50    float64 `json:"p50_ms"`
	P99    float64 `json:"p99_ms"`
	Mean   float64 `json:"mean_ms"`
	WallMs float64 `json:"wall_ms,omitempty"`
}

func summarise(ds []time.Duration) Latencies {
	if len(ds) == 0 {
		return Latencies{}
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	rank := func(p float64) float64 {
		i := int(float64(len(s))*p+0.999999) - 1
		if i < 0 {
			i = 0
		}
		return ms(s[i])
	}
	var sum time.Duration
	for _, d := range s {
		sum += d
	}
	return Latencies{N: len(s), P50: rank(0.50), P99: rank(0.99), Mean: ms(sum / time.Duration(len(s)))}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// Memory is the management PSS (everything but the workload) at a number
// of running pods.
type Memory struct {
	Pods       int            `json:"pods"`
	TotalKB    int            `json:"total_kb"`
	PerPodKB   float64        `json:"per_pod_kb"`
	AddedKB    float64        `json:"added_per_pod_kb"` // (total - idle) / pods
	ByProcess  map[string]int `json:"by_process_kb"`
	Processes  int            `json:"processes"`
	PerPodProc float64        `json:"processes_per_pod"`
}

// Result is one target's figures.
type Result struct {
	Handler         string    `json:"handler"`
	StartSequential Latencies `json:"pod_start_sequential"`
	StartConcurrent Latencies `json:"pod_start_concurrent"`
	StopRemove      Latencies `json:"pod_stop_remove"`
	IdleKB          int       `json:"idle_management_kb"`
	Memory          []Memory  `json:"memory"`
	RestartReadyMs  float64   `json:"restart_until_ready_ms"`
	RestartPods     int       `json:"restart_pods"`
	// Phases of the sequential starts: RunPodSandbox, CreateContainer,
	// StartContainer.
	Phases           map[string]Latencies `json:"pod_start_phases"`
	ContainersPerPod int                  `json:"containers_per_pod"`
}

// Report is what a run writes.
type Report struct {
	Date     string             `json:"date"`
	Machine  map[string]string  `json:"machine"`
	Versions map[string]string  `json:"versions"`
	Pods     int                `json:"pods"`
	Results  map[string]*Result `json:"results"`
	Ratios   map[string]float64 `json:"ratios_kuasar_over_stock"`
}

func TestBench(t *testing.T) {
	n := envInt("KUASAR_BENCH_PODS", 50)
	outDir := os.Getenv("KUASAR_BENCH_OUT")
	if outDir == "" {
		outDir = "../bench/results"
	}
	stock := &target{Name: "stock", Handler: stockRunc, d: startDaemon(t, daemonOptions{stock: true})}
	kuasar := &target{Name: "kuasar-runc", Handler: kuasarRunc, d: startDaemon(t, daemonOptions{})}
	targets := []*target{stock, kuasar}
	rep := &Report{
		Date:     time.Now().UTC().Format(time.RFC3339),
		Machine:  machine(),
		Versions: versions(t, stock.d, kuasar.d),
		Pods:     n,
		Results:  map[string]*Result{},
	}
	for _, tg := range targets {
		rep.Results[tg.Name] = &Result{Handler: tg.Handler, ContainersPerPod: 1}
		tg.d.recordKeeper()
		// Warm up: the first pod pays for one-off work (image unpack, CNI
		// plugin loading) on both sides.
		tg.startPod(t, "warmup")
		tg.stopRemove(t, tg.pods[0])
		tg.pods, tg.phases = nil, nil
		time.Sleep(time.Second)
		tg.d.recordKeeper()
		rep.Results[tg.Name].IdleKB = managementMemory(tg.d).TotalKB
	}

	// Sequential starts, alternating the two daemons pod by pod so that
	// machine noise hits both alike; memory is read at 10 pods on the way.
	seq := map[string][]time.Duration{}
	for i := 0; i < n; i++ {
		for _, tg := range targets {
			seq[tg.Name] = append(seq[tg.Name], tg.startPod(t, fmt.Sprintf("seq%d", i)))
		}
		if i+1 == 10 && n > 10 {
			for _, tg := range targets {
				rep.Results[tg.Name].Memory = append(rep.Results[tg.Name].Memory, tg.memory(rep.Results[tg.Name].IdleKB))
			}
		}
	}
	for _, tg := range targets {
		r := rep.Results[tg.Name]
		r.StartSequential = summarise(seq[tg.Name])
		r.Phases = map[string]Latencies{}
		for phase, ds := range tg.phases {
			r.Phases[phase] = summarise(ds)
		}
		r.Memory = append(r.Memory, tg.memory(r.IdleKB))
	}

	// Restart with n pods running, until every pod and container is ready.
	for _, tg := range targets {
		r := rep.Results[tg.Name]
		r.RestartPods = len(tg.pods)
		r.RestartReadyMs = ms(tg.restartUntilReady(t))
	}

	// n more pods started all at once.
	for _, tg := range targets {
		lat, wall := tg.startConcurrently(t, n)
		r := rep.Results[tg.Name]
		r.StartConcurrent = summarise(lat)
		r.StartConcurrent.WallMs = ms(wall)
		time.Sleep(time.Second)
		r.Memory = append(r.Memory, tg.memory(r.IdleKB))
	}

	// Stop and remove everything, one pod at a time, alternating.
	stops := map[string][]time.Duration{}
	for i := 0; i < 2*n; i++ {
		for _, tg := range targets {
			stops[tg.Name] = append(stops[tg.Name], tg.stopRemove(t, tg.pods[i]))
		}
	}
	for _, tg := range targets {
		rep.Results[tg.Name].StopRemove = summarise(stops[tg.Name])
	}

	rep.Ratios = ratios(rep.Results[stock.Name], rep.Results[kuasar.Name])
	if err := write(outDir, rep); err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + markdown(rep))
}

func (tg *target) podConfig(name string) (*runtimeapi.PodSandboxConfig, *runtimeapi.ContainerConfig) {
	p := tg.d.podConfig("bench-" + name)
	return p, ctrConfig("work", "sleep", "36000")
}

// startPod runs a pod and its container, timing RunPodSandbox through
// StartContainer.
func (tg *target) startPod(t *testing.T, name string) time.Duration {
	t.Helper()
	podCfg, ctrCfg := tg.podConfig(name)
	begin := time.Now()
	pod := tg.d.runPod(t, tg.Handler, podCfg)
	ran := time.Now()
	id := tg.d.create(t, pod, podCfg, ctrCfg)
	created := time.Now()
	tg.d.start1(t, id)
	took := time.Since(begin)
	if tg.phases == nil {
		tg.phases = map[string][]time.Duration{}
	}
	tg.phases["RunPodSandbox"] = append(tg.phases["RunPodSandbox"], ran.Sub(begin))
	tg.phases["CreateContainer"] = append(tg.phases["CreateContainer"], created.Sub(ran))
	tg.phases["StartContainer"] = append(tg.phases["StartContainer"], took-created.Sub(begin))
	tg.pods = append(tg.pods, pod)
	return took
}

func (tg *target) startConcurrently(t *testing.T, n int) ([]time.Duration, time.Duration) {
	t.Helper()
	var (
		mu   sync.Mutex
		lat  []time.Duration
		pods []string
		wg   sync.WaitGroup
		errs []error
	)
	begin := time.Now()
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			podCfg, ctrCfg := tg.podConfig(fmt.Sprintf("conc%d", i))
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			start := time.Now()
			r, err := tg.d.RS.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: podCfg, RuntimeHandler: tg.Handler})
			if err == nil {
				var c *runtimeapi.CreateContainerResponse
				if c, err = tg.d.RS.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: r.PodSandboxId, Config: ctrCfg, SandboxConfig: podCfg}); err == nil {
					_, err = tg.d.RS.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: c.ContainerId})
				}
			}
			took := time.Since(start)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			lat = append(lat, took)
			pods = append(pods, r.PodSandboxId)
		}(i)
	}
	wg.Wait()
	wall := time.Since(begin)
	if len(errs) > 0 {
		// Reported, and the run goes on with the pods that started: a
		// benchmark reports what it measured.
		t.Errorf("%s: %d concurrent starts failed, first: %v", tg.Name, len(errs), errs[0])
	}
	tg.pods = append(tg.pods, pods...)
	return lat, wall
}

func (tg *target) stopRemove(t *testing.T, pod string) time.Duration {
	t.Helper()
	begin := time.Now()
	tg.d.removePod(t, pod)
	return time.Since(begin)
}

// restartUntilReady restarts the daemon (SIGTERM) and waits until CRI
// reports every pod ready and every container running.
func (tg *target) restartUntilReady(t *testing.T) time.Duration {
	t.Helper()
	begin := time.Now()
	tg.d.restart(syscall.SIGTERM)
	for {
		ready := 0
		pods, err := tg.d.RS.ListPodSandbox(ctx(t), &runtimeapi.ListPodSandboxRequest{})
		if err == nil {
			for _, p := range pods.Items {
				if p.State == runtimeapi.PodSandboxState_SANDBOX_READY {
					ready++
				}
			}
		}
		running := 0
		ctrs, err := tg.d.RS.ListContainers(ctx(t), &runtimeapi.ListContainersRequest{})
		if err == nil {
			for _, c := range ctrs.Containers {
				if c.State == runtimeapi.ContainerState_CONTAINER_RUNNING {
					running++
				}
			}
		}
		if ready == len(tg.pods) && running == len(tg.pods) {
			return time.Since(begin)
		}
		if time.Since(begin) > 5*time.Minute {
			t.Fatalf("%s: %d/%d pods ready, %d containers running after restart", tg.Name, ready, len(tg.pods), running)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (tg *target) memory(idleKB int) Memory {
	time.Sleep(2 * time.Second) // let start-up allocations settle
	m := managementMemory(tg.d)
	m.Pods = len(tg.pods)
	m.PerPodKB = float64(m.TotalKB) / float64(m.Pods)
	m.AddedKB = float64(m.TotalKB-idleKB) / float64(m.Pods)
	m.PerPodProc = float64(m.Processes-1) / float64(m.Pods) // beyond the daemon itself
	return m
}

// managementMemory sums the PSS of every process that is not a workload:
// the daemon, its shims and pause processes, the keeper and PID namespace
// holders.
func managementMemory(d *Daemon) Memory {
	m := Memory{ByProcess: map[string]int{}}
	add := func(kind string, pid int) {
		kb := pssKB(pid)
		m.ByProcess[kind] += kb
		m.TotalKB += kb
		m.Processes++
	}
	if d.cmd != nil {
		add("daemon", d.cmd.Process.Pid)
	}
	parents := map[int]bool{}
	for _, s := range shimsOf(d) {
		add("shim", s.Pid)
		parents[s.Pid] = true
	}
	if d.keeperPid != 0 {
		add("keeper", d.keeperPid)
		parents[d.keeperPid] = true
	}
	if d.wasmHost != 0 {
		add("wasm-host", d.wasmHost)
	}
	for _, p := range allProcs() {
		if p.Comm == "pause" && parents[p.PPid] {
			add("pause", p.Pid)
		}
	}
	return m
}

func pssKB(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "Pss:" {
			v, _ := strconv.Atoi(f[1])
			return v
		}
	}
	return 0
}

func ratios(s, k *Result) map[string]float64 {
	r := map[string]float64{}
	div := func(name string, a, b float64) {
		if b > 0 {
			r[name] = round(a / b)
		}
	}
	div("pod_start_sequential_p50", k.StartSequential.P50, s.StartSequential.P50)
	div("pod_start_sequential_p99", k.StartSequential.P99, s.StartSequential.P99)
	div("pod_start_concurrent_p50", k.StartConcurrent.P50, s.StartConcurrent.P50)
	div("pod_start_concurrent_p99", k.StartConcurrent.P99, s.StartConcurrent.P99)
	div("pod_start_concurrent_wall", k.StartConcurrent.WallMs, s.StartConcurrent.WallMs)
	div("pod_stop_remove_p50", k.StopRemove.P50, s.StopRemove.P50)
	div("pod_stop_remove_p99", k.StopRemove.P99, s.StopRemove.P99)
	div("restart_until_ready", k.RestartReadyMs, s.RestartReadyMs)
	for i := range s.Memory {
		if i < len(k.Memory) {
			div(fmt.Sprintf("memory_per_pod_at_%d", s.Memory[i].Pods), k.Memory[i].PerPodKB, s.Memory[i].PerPodKB)
			div(fmt.Sprintf("memory_added_per_pod_at_%d", s.Memory[i].Pods), k.Memory[i].AddedKB, s.Memory[i].AddedKB)
		}
	}
	return r
}

func round(v float64) float64 { return float64(int(v*1000+0.5)) / 1000 }

func markdown(rep *Report) string {
	s, k := rep.Results["stock"], rep.Results["kuasar-runc"]
	var b strings.Builder
	fmt.Fprintf(&b, "### containerd-kuasar `kuasar-runc` vs stock containerd `runc` (%s)\n\n", rep.Date)
	fmt.Fprintf(&b, "Machine: %s, %s CPUs, %s, kernel %s. Versions: %s.\n\n", rep.Machine["cpu"], rep.Machine["cpus"], rep.Machine["memory"], rep.Machine["kernel"], joinMap(rep.Versions))
	fmt.Fprintf(&b, "| figure | stock (podsandbox + shim + pause) | kuasar-runc | kuasar / stock |\n|---|---:|---:|---:|\n")
	row := func(name string, a, c float64, unit, ratioKey string) {
		fmt.Fprintf(&b, "| %s | %.1f %s | %.1f %s | **%.3f** |\n", name, a, unit, c, unit, rep.Ratios[ratioKey])
	}
	row(fmt.Sprintf("pod start, sequential, p50 (%d pods)", s.StartSequential.N), s.StartSequential.P50, k.StartSequential.P50, "ms", "pod_start_sequential_p50")
	row("pod start, sequential, p99", s.StartSequential.P99, k.StartSequential.P99, "ms", "pod_start_sequential_p99")
	for _, phase := range []string{"RunPodSandbox", "CreateContainer", "StartContainer"} {
		fmt.Fprintf(&b, "| &nbsp;&nbsp;of which %s, p50 | %.1f ms | %.1f ms | %.3f |\n", phase, s.Phases[phase].P50, k.Phases[phase].P50, round(k.Phases[phase].P50/s.Phases[phase].P50))
	}
	row(fmt.Sprintf("pod start, %d concurrent, p50", s.StartConcurrent.N), s.StartConcurrent.P50, k.StartConcurrent.P50, "ms", "pod_start_concurrent_p50")
	row("pod start, concurrent, p99", s.StartConcurrent.P99, k.StartConcurrent.P99, "ms", "pod_start_concurrent_p99")
	row("pod start, concurrent, wall time", s.StartConcurrent.WallMs, k.StartConcurrent.WallMs, "ms", "pod_start_concurrent_wall")
	row(fmt.Sprintf("pod stop+remove, p50 (%d pods)", s.StopRemove.N), s.StopRemove.P50, k.StopRemove.P50, "ms", "pod_stop_remove_p50")
	row("pod stop+remove, p99", s.StopRemove.P99, k.StopRemove.P99, "ms", "pod_stop_remove_p99")
	for i := range s.Memory {
		if i < len(k.Memory) {
			n := s.Memory[i].Pods
			row(fmt.Sprintf("management PSS per pod, %d pods (total / pods)", n), s.Memory[i].PerPodKB, k.Memory[i].PerPodKB, "kB", fmt.Sprintf("memory_per_pod_at_%d", n))
			row(fmt.Sprintf("management PSS added per pod, %d pods", n), s.Memory[i].AddedKB, k.Memory[i].AddedKB, "kB", fmt.Sprintf("memory_added_per_pod_at_%d", n))
		}
	}
	row(fmt.Sprintf("daemon restart until %d pods ready", s.RestartPods), s.RestartReadyMs, k.RestartReadyMs, "ms", "restart_until_ready")
	fmt.Fprintf(&b, "\nManagement processes at the largest size: stock %v, kuasar-runc %v (kB PSS).\n",
		s.Memory[len(s.Memory)-1].ByProcess, k.Memory[len(k.Memory)-1].ByProcess)
	return b.String()
}

func joinMap(m map[string]string) string {
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, k+" "+m[k])
	}
	return strings.Join(parts, ", ")
}

func write(dir string, rep *Report) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	stamp := time.Now().UTC().Format("20060102-150405")
	if err := os.WriteFile(filepath.Join(dir, "runc-"+stamp+".json"), b, 0o644); err != nil {
		return err
	}
	md := markdown(rep)
	if err := os.WriteFile(filepath.Join(dir, "runc-"+stamp+".md"), []byte(md), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "runc-latest.json"), b, 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "runc-latest.md"), []byte(md), 0o644)
}

func machine() map[string]string {
	m := map[string]string{"cpus": strconv.Itoa(runtime.NumCPU()), "arch": runtime.GOARCH}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, "model name") {
				m["cpu"] = strings.TrimSpace(strings.SplitN(line, ":", 2)[1])
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0])
		if len(f) >= 2 {
			kb, _ := strconv.Atoi(f[1])
			m["memory"] = fmt.Sprintf("%.0f GiB", float64(kb)/(1<<20))
		}
	}
	var u syscall.Utsname
	if syscall.Uname(&u) == nil {
		var rel []byte
		for _, c := range u.Release {
			if c == 0 {
				break
			}
			rel = append(rel, byte(c))
		}
		m["kernel"] = string(rel)
	}
	return m
}

func versions(t *testing.T, stock, kuasar *Daemon) map[string]string {
	v := map[string]string{}
	if r, err := stock.RS.Version(ctx(t), &runtimeapi.VersionRequest{}); err == nil {
		v["stock containerd"] = r.RuntimeVersion
	}
	if out, err := execOut(filepath.Join(binDir, "containerd-kuasar"), "--version"); err == nil {
		v["containerd-kuasar"] = strings.Fields(out)[1]
	}
	if out, err := execOut("runc", "--version"); err == nil {
		v["runc"] = strings.Fields(out)[2]
	}
	return v
}
