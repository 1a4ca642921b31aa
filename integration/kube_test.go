//go:build kube

package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	introspection "github.com/containerd/containerd/api/services/introspection/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/integration/images"
)

// kubeHandlers are the runtime handlers `make e2e-kube` runs pods of, one
// line each: the CRI handler, the RuntimeClass of
// contrib/kubernetes/runtimeclasses.yaml that selects it ("" for the
// node's default handler, stock runc), and how its workloads are written.
// A new kind of sandbox is one more line (kuasar-vmm and kuasar-gvisor run
// Linux images: linuxWorkload).
var kubeHandlers = []kubeHandler{
	{handler: stockRunc, workload: linuxWorkload},
	{handler: kuasarRunc, runtimeClass: kuasarRunc, controller: kuasarRunc, workload: linuxWorkload},
	{handler: kuasarWasm, runtimeClass: kuasarWasm, controller: kuasarWasm, workload: wasmWorkload},
	{handler: kuasarVMM, runtimeClass: kuasarVMM, controller: kuasarVMM, workload: linuxWorkload},
	{handler: kuasarGVisor, runtimeClass: kuasarGVisor, controller: "kuasar-appkernel", workload: linuxWorkload},
}

type kubeHandler struct {
	handler      string
	runtimeClass string
	// controller is the ID of the sandbox controller behind the handler
	// ("" for stock containerd's): a controller that does not load on this
	// machine (it says why) skips its line, with its reason.
	controller string
	workload   *kubeWorkload
	// gaps are checks (subtests of each handler: pulled, logs, exec,
	// port-forward, limits, probes) the kind cannot pass yet, with why:
	// each is a skipped subtest that prints it.
	gaps map[string]string
}

// run runs one check of the handler's, or skips it with the reason the
// handler's line gives.
func (h kubeHandler) run(t *testing.T, name string, f func(t *testing.T)) {
	t.Helper()
	t.Run(name, func(t *testing.T) {
		if why := h.gaps[name]; why != "" {
			t.Skipf("skipping %s for %s: %s", name, h.handler, why)
		}
		f(t)
	})
}

// kubeCmd is what a container runs: the image's entrypoint replaced
// (command) or given arguments (args), as a pod spec says it.
type kubeCmd struct {
	command, args []string
}

// kubeWorkload is how pods of one family of images are written. Every pod
// pulls its image through the kubelet, by one of the names users write.
type kubeWorkload struct {
	// Image names: a short name with no tag (docker.io/library/<name>:latest),
	// a short name with a tag, and what the digest name is made of.
	// digestImage (a test image, full name) is also pushed as
	// latestFullName, and pulled by digest as digestRepo@sha256:...
	latest, tagged string
	digestRepo     string
	digestImage    string
	latestFullName string

	// web serves HTTP on port 8080: GET / answers with the word it is given
	// (%s in the command), and it logs a line containing "serving".
	web            func(word string) kubeCmd
	webAnnotations map[string]string // pod annotations of the web pod
	// webPage is the path port-forward fetches, and webWant what its page
	// holds.
	webPage string
	webWant func(word string) string
	// healthy and failing are exec probe commands (in the web image, and in
	// the :latest image).
	healthy, failing []string
	// job prints "job done by $(KUASAR_HANDLER)" and exits 0 (digest image).
	job kubeCmd
	// exec runs in the web container and prints execWant; stdin echoes
	// what it reads.
	exec      []string
	execWant  string
	stdin     []string
	limits    []string // prints the container's limits (nil: the kind shows them only by OOM)
	oom       kubeCmd  // allocates past a 32 MiB limit (tagged image)
	oomReason string
}

var linuxWorkload = &kubeWorkload{
	latest:         "busybox",
	latestFullName: "docker.io/library/busybox:latest",
	tagged:         "busybox:kuasar",
	digestRepo:     "busybox",
	digestImage:    images.Busybox,
	web: func(word string) kubeCmd {
		return kubeCmd{command: []string{"sh", "-c", "mkdir -p /www && echo " + word + " > /www/index.html && echo serving $(hostname) && exec httpd -f -p 8080 -h /www"}}
	},
	webPage:  "/",
	webWant:  func(word string) string { return word },
	healthy:  []string{"test", "-f", "/www/index.html"},
	failing:  []string{"cat", "/no-such-file"},
	job:      kubeCmd{command: []string{"sh", "-c", "echo job done by $(KUASAR_HANDLER)"}},
	exec:     []string{"sh", "-c", "echo exec-$((6*7)) in $(hostname)"},
	execWant: "exec-42 in ",
	stdin:    []string{"sh", "-c", "read x; echo got $x"},
	limits:   []string{"sh", "-c", "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max"},
	// tail keeps its whole input, which has no newline: memory grows until
	// the OOM killer ends it (one big allocation could just fail, as in a
	// small VM).
	oom: kubeCmd{command: []string{"sh", "-c", "echo start; head -c 400m /dev/zero | tail > /dev/null"}},
}

// wasmWorkload runs the WASI test module (integration/wasmapp), from its
// ordinary image (wasm-app:rootfs, module at /app/app.wasm) and its Wasm
// layer image (module as /app.wasm).
var wasmWorkload = &kubeWorkload{
	latest:         "wasm-app",
	latestFullName: "docker.io/library/wasm-app:latest",
	tagged:         "wasm-app:rootfs",
	digestRepo:     "wasm-app",
	digestImage:    images.WasmLayer,
	web: func(word string) kubeCmd {
		// The module's server answers "hello from wasm over http: <request line>".
		return kubeCmd{args: []string{"serve", "4"}}
	},
	// WASI preview 1 cannot open sockets: the module gets its listener
	// pre-opened, from the pod's annotation.
	webAnnotations: map[string]string{"wasm.kuasar.io/listen": "0.0.0.0:8080"},
	webPage:        "/kube",
	webWant:        func(string) string { return "hello from wasm over http: GET /kube" },
	healthy:        []string{"/app/app.wasm", "cat", "/app/notes.txt"},
	failing:        []string{"/app.wasm", "exit", "3"},
	job:            kubeCmd{args: []string{"echo", "job done by $(KUASAR_HANDLER)"}},
	exec:           []string{"/app/app.wasm", "echo", "exec-42"},
	execWant:       "exec-42",
	stdin:          []string{"/app/app.wasm", "stdin"},
	oom:            kubeCmd{args: []string{"hog", "8"}},
}

const kubeNamespace = "kuasar-e2e"

// TestKube runs a real kubelet (and API server and etcd) against
// containerd-kuasar and drives pods of every handler through the
// Kubernetes API: images pulled by the kubelet by the names users write,
// Running and Completed pods, logs, exec, port-forward, limits, probes, a
// restart of the daemon under the running kubelet, deletion and the
// kubelet's garbage collection, and that nothing leaked.
func TestKube(t *testing.T) {
	lockKubeNode(t)
	d := startDaemon(t, daemonOptions{})
	ctx := context.Background()
	handlers := d.kubeHandlersHere(t)
	digests := map[*kubeWorkload]string{}
	for _, h := range handlers {
		w := h.workload
		if _, done := digests[w]; done {
			continue
		}
		from, err := images.MirrorRef(registry, w.digestImage)
		must(t, err, "%s", w.digestImage)
		img, err := remote.Image(from, remote.WithContext(ctx))
		must(t, err, "reading %s from the local registry", w.digestImage)
		must(t, images.Push(ctx, registry, w.latestFullName, img), "pushing %s", w.latestFullName)
		dg, err := img.Digest()
		must(t, err, "digest of %s", w.digestImage)
		digests[w] = dg.String()
	}

	begin := time.Now()
	c := startKubeCluster(t, d)
	t.Logf("control plane and kubelet up in %v", time.Since(begin).Round(time.Millisecond))

	rc, err := os.ReadFile(filepath.Join("..", "contrib", "kubernetes", "runtimeclasses.yaml"))
	must(t, err, "contrib's RuntimeClasses")
	c.apply(t, string(rc))
	c.setupNamespace(t)

	// Every pod of every handler at once, as a node gets them.
	pods := map[string]*kubePods{}
	for _, h := range handlers {
		p := newKubePods(h, digests[h.workload])
		pods[h.handler] = p
		for _, pod := range p.all() {
			c.apply(t, pod.obj)
		}
	}

	for _, h := range handlers {
		t.Run(h.handler, func(t *testing.T) { c.checkPods(t, h, pods[h.handler]) })
	}
	if t.Failed() {
		return
	}

	// The pods whose liveness probe fails restart all the time: gone
	// before the daemon restarts, whose check is that nothing restarts.
	for _, h := range handlers {
		c.kubectlOut(t, "-n", kubeNamespace, "delete", "pod", pods[h.handler].probe.name, "--wait=true", "--timeout=2m")
	}
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		t.Run("restart-"+sig.String(), func(t *testing.T) { c.checkRestart(t, sig, handlers, pods) })
	}

	t.Run("delete-and-gc", func(t *testing.T) { c.checkDeleteAndGC(t) })
}

// kubeHandlersHere are the lines of kubeHandlers whose controller loaded in
// d; each of the others is a skipped subtest that says why.
func (d *Daemon) kubeHandlersHere(t *testing.T) []kubeHandler {
	t.Helper()
	r, err := introspection.NewIntrospectionClient(d.conn).Plugins(ctx(t), &introspection.PluginsRequest{
		Filters: []string{"type==io.containerd.sandbox.controller.v1"},
	})
	must(t, err, "listing the daemon's sandbox controllers")
	loaded := map[string]error{}
	for _, p := range r.Plugins {
		if e := p.GetInitErr(); e != nil {
			loaded[p.ID] = fmt.Errorf("its controller %s did not load: %s", p.ID, e.GetMessage())
		} else {
			loaded[p.ID] = nil
		}
	}
	var out []kubeHandler
	for _, h := range kubeHandlers {
		err, known := loaded[h.controller]
		if h.controller != "" && !known {
			err = fmt.Errorf("this containerd-kuasar has no controller %s", h.controller)
		}
		if h.controller == "" || err == nil {
			out = append(out, h)
			continue
		}
		t.Run(h.handler, func(t *testing.T) { t.Skipf("skipping pods of handler %s: %v", h.handler, err) })
	}
	if len(out) == 0 {
		t.Fatal("no handler to run pods of")
	}
	return out
}

// kubePod is a pod manifest and what the test expects of it.
type kubePod struct {
	name string
	obj  map[string]any
}

// kubePods are one handler's pods.
type kubePods struct {
	web, job, probe, oom kubePod
}

func (p *kubePods) all() []kubePod { return []kubePod{p.web, p.job, p.probe, p.oom} }

func newKubePods(h kubeHandler, digest string) *kubePods {
	w := h.workload
	mk := func(name, image string, cmd kubeCmd, restart string, annotations map[string]string, extra map[string]any) kubePod {
		ctr := map[string]any{
			"name":            "main",
			"image":           image,
			"imagePullPolicy": "Always",
			"env":             []any{map[string]any{"name": "KUASAR_HANDLER", "value": h.handler}},
		}
		if cmd.command != nil {
			ctr["command"] = cmd.command
		}
		if cmd.args != nil {
			ctr["args"] = cmd.args
		}
		for k, v := range extra {
			ctr[k] = v
		}
		spec := map[string]any{
			// No scheduler runs: the pod names its node.
			"nodeName":                      kubeNodeName,
			"restartPolicy":                 restart,
			"terminationGracePeriodSeconds": 2,
			"containers":                    []any{ctr},
		}
		if h.runtimeClass != "" {
			spec["runtimeClassName"] = h.runtimeClass
		}
		meta := map[string]any{"name": h.handler + "-" + name, "namespace": kubeNamespace, "labels": map[string]string{"kuasar-e2e/handler": h.handler}}
		if annotations != nil {
			meta["annotations"] = annotations
		}
		return kubePod{name: h.handler + "-" + name, obj: map[string]any{"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}}
	}
	execProbe := func(cmd []string, period, failures int) map[string]any {
		return map[string]any{"exec": map[string]any{"command": cmd}, "periodSeconds": period, "failureThreshold": failures, "timeoutSeconds": 60}
	}
	return &kubePods{
		// Burstable: 500m CPU and 64 MiB at most, 50m CPU asked for (the
		// pods of every handler fit the 2 CPUs of a small node together;
		// an exec runs in the container's cgroup, and a small quota makes
		// it crawl in an emulated VM). Probes that pass: generous with
		// time, for a busy machine and an emulated VM.
		web: mk("web", w.tagged, w.web(webWord(h)), "Always", w.webAnnotations, map[string]any{
			"ports": []any{map[string]any{"containerPort": 8080}},
			"readinessProbe": map[string]any{"httpGet": map[string]any{"path": "/", "port": 8080},
				"periodSeconds": 2, "timeoutSeconds": 10, "failureThreshold": 3},
			"livenessProbe": execProbe(w.healthy, 10, 3),
			"resources": map[string]any{
				"requests": map[string]string{"cpu": "50m", "memory": "64Mi"},
				"limits":   map[string]string{"cpu": "500m", "memory": "64Mi"},
			},
		}),
		job:   mk("job", w.digestRepo+"@"+digest, w.job, "Never", nil, nil),
		probe: mk("probe", w.latest, w.web(webWord(h)), "Always", w.webAnnotations, map[string]any{"livenessProbe": execProbe(w.failing, 1, 1)}),
		oom: mk("oom", w.tagged, w.oom, "Never", nil, map[string]any{
			"resources": map[string]any{"limits": map[string]string{"memory": "32Mi"}},
		}),
	}
}

func webWord(h kubeHandler) string { return "web-of-" + h.handler }

// setupNamespace makes the test's namespace with what the controllers that
// do not run here (no kube-controller-manager) would add: its default
// service account and the cluster's CA for projected tokens.
func (c *kubeCluster) setupNamespace(t *testing.T) {
	ca, err := os.ReadFile(c.pki.path("ca.crt"))
	must(t, err, "CA")
	c.apply(t, map[string]any{"apiVersion": "v1", "kind": "List", "items": []any{
		map[string]any{"apiVersion": "v1", "kind": "Namespace", "metadata": map[string]any{"name": kubeNamespace}},
		map[string]any{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": map[string]any{"name": "default", "namespace": kubeNamespace}},
		map[string]any{"apiVersion": "v1", "kind": "ConfigMap", "metadata": map[string]any{"name": "kube-root-ca.crt", "namespace": kubeNamespace},
			"data": map[string]string{"ca.crt": string(ca)}},
	}})
}

// podState is the part of a Pod the test reads.
type podState struct {
	Metadata struct {
		Name string
		UID  string
	}
	Status struct {
		Phase      string
		Conditions []struct {
			Type, Status string
		}
		ContainerStatuses []ctrState
	}
}

type ctrState struct {
	Name         string
	Ready        bool
	RestartCount int
	Image        string
	ImageID      string
	ContainerID  string
	State        termState
	LastState    termState
}

type termState struct {
	Running *struct {
		StartedAt string
	}
	Waiting *struct {
		Reason, Message string
	}
	Terminated *struct {
		ExitCode int
		Reason   string
		Message  string
	}
}

func (p *podState) condition(typ string) string {
	for _, c := range p.Status.Conditions {
		if c.Type == typ {
			return c.Status
		}
	}
	return ""
}

func (p *podState) ctr() ctrState {
	if len(p.Status.ContainerStatuses) == 0 {
		return ctrState{}
	}
	return p.Status.ContainerStatuses[0]
}

func (p *podState) String() string {
	b, _ := json.Marshal(p.Status)
	return string(b)
}

func (c *kubeCluster) pod(t *testing.T, name string) *podState {
	t.Helper()
	var p podState
	must(t, json.Unmarshal([]byte(c.kubectlOut(t, "-n", kubeNamespace, "get", "pod", name, "-o", "json")), &p), "pod %s", name)
	return &p
}

// waitPod waits until ok holds for the pod, for at most six minutes (the
// first pull of an image, a cold Wasm compile, emulated VMs booting side by
// side on a busy machine, and a sandbox start the kubelet gave up on after
// its two minutes and tried again, included).
func (c *kubeCluster) waitPod(t *testing.T, name, what string, ok func(*podState) bool) *podState {
	t.Helper()
	deadline := time.Now().Add(6 * time.Minute)
	for {
		c.alive()
		p := c.pod(t, name)
		if ok(p) {
			return p
		}
		// Succeeded and Failed are final (a pod the kubelet refused is
		// Failed at once).
		if final := p.Status.Phase == "Succeeded" || p.Status.Phase == "Failed"; final || time.Now().After(deadline) {
			ev := c.kubectlOut(t, "-n", kubeNamespace, "get", "events", "--field-selector", "involvedObject.name="+name)
			t.Fatalf("pod %s is not %s: %s\nevents:\n%s", name, what, p, ev)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// sandboxOf is the CRI sandbox of a pod, as containerd-kuasar lists it.
func (c *kubeCluster) sandboxOf(t *testing.T, uid string) []*runtimeapi.PodSandbox {
	t.Helper()
	r, err := c.d.RS.ListPodSandbox(ctx(t), &runtimeapi.ListPodSandboxRequest{Filter: &runtimeapi.PodSandboxFilter{
		LabelSelector: map[string]string{"io.kubernetes.pod.uid": uid},
	}})
	must(t, err, "ListPodSandbox")
	return r.Items
}

// checkPods checks one handler's pods once they settled.
func (c *kubeCluster) checkPods(t *testing.T, h kubeHandler, pods *kubePods) {
	w := h.workload
	web := c.waitPod(t, pods.web.name, "running and ready", func(p *podState) bool {
		return p.Status.Phase == "Running" && p.condition("Ready") == "True"
	})
	// The RuntimeClass reached CRI: the pod's sandbox runs on its handler.
	// A pod without a RuntimeClass reaches CRI with no handler, and CRI
	// runs it on its default one (stock runc).
	criHandler := h.handler
	if h.runtimeClass == "" {
		criHandler = ""
	}
	sbs := c.sandboxOf(t, web.Metadata.UID)
	if len(sbs) != 1 || sbs[0].RuntimeHandler != criHandler || sbs[0].State != runtimeapi.PodSandboxState_SANDBOX_READY {
		t.Fatalf("sandboxes of %s: %v, want one ready on handler %q", pods.web.name, sbs, criHandler)
	}
	t.Logf("%s: running and ready, sandbox %s on %s, image %s (%s)", pods.web.name, short(sbs[0].Id), h.handler, web.ctr().Image, web.ctr().ImageID)

	job := c.waitPod(t, pods.job.name, "completed", func(p *podState) bool { return p.Status.Phase == "Succeeded" || p.Status.Phase == "Failed" })
	if st := job.ctr().State.Terminated; job.Status.Phase != "Succeeded" || st == nil || st.Reason != "Completed" || st.ExitCode != 0 {
		t.Errorf("%s: %s, want Succeeded, Completed, exit code 0", pods.job.name, job)
	}
	if want := pods.job.obj["spec"].(map[string]any)["containers"].([]any)[0].(map[string]any)["image"].(string); !strings.HasSuffix(job.ctr().ImageID, strings.SplitN(want, "@", 2)[1]) {
		t.Errorf("%s: image ID %s, want the digest it was pulled by (%s)", pods.job.name, job.ctr().ImageID, want)
	}

	h.run(t, "pulled", func(t *testing.T) {
		// The kubelet pulled each image itself, by the name the pod
		// gives: a short name, a tag, a digest.
		for _, pod := range []kubePod{pods.web, pods.job, pods.probe} {
			c.waitPulled(t, pod)
		}
	})
	h.run(t, "logs", func(t *testing.T) {
		if out := c.kubectlOut(t, "-n", kubeNamespace, "logs", pods.job.name); !strings.Contains(out, "job done by "+h.handler) {
			t.Errorf("kubectl logs %s: %q", pods.job.name, out)
		}
		if out := c.kubectlOut(t, "-n", kubeNamespace, "logs", pods.web.name); !strings.Contains(out, "serving") {
			t.Errorf("kubectl logs %s: %q", pods.web.name, out)
		}
	})
	h.run(t, "exec", func(t *testing.T) {
		args := append([]string{"-n", kubeNamespace, "exec", pods.web.name, "--"}, w.exec...)
		if out := c.kubectlOut(t, args...); !strings.Contains(out, w.execWant) {
			t.Errorf("kubectl exec %v: %q, want %q", w.exec, out, w.execWant)
		}
		args = append([]string{"-n", kubeNamespace, "exec", "-i", pods.web.name, "--"}, w.stdin...)
		if out := c.kubectlIn(t, []byte("through-stdin\n"), args...); !strings.Contains(out, "through-stdin") {
			t.Errorf("kubectl exec -i %v: %q", w.stdin, out)
		}
		// An exec that fails says so, with its exit code.
		cmd := c.kubectl(append([]string{"-n", kubeNamespace, "exec", pods.web.name, "--"}, w.failing...)...)
		if err := cmd.Run(); err == nil {
			t.Errorf("kubectl exec %v succeeded", w.failing)
		}
	})
	h.run(t, "port-forward", func(t *testing.T) { c.checkPortForward(t, h, pods.web.name) })
	h.run(t, "limits", func(t *testing.T) {
		if w.limits != nil {
			out := c.kubectlOut(t, append([]string{"-n", kubeNamespace, "exec", pods.web.name, "--"}, w.limits...)...)
			// 64 MiB, and 500m of a 100 ms CFS period.
			if f := strings.Fields(out); len(f) < 2 || f[0] != fmt.Sprint(64<<20) || f[1] != "50000" {
				t.Errorf("limits seen inside %s: %q, want 67108864 and 50000", pods.web.name, out)
			}
		}
		oom := c.waitPod(t, pods.oom.name, "ended", func(p *podState) bool { return p.Status.Phase == "Failed" || p.Status.Phase == "Succeeded" })
		if st := oom.ctr().State.Terminated; st == nil || st.Reason != "OOMKilled" || st.ExitCode != 137 {
			t.Errorf("%s over its 32 MiB: %s, want OOMKilled, exit code 137", pods.oom.name, oom)
		}
	})
	h.run(t, "probes", func(t *testing.T) {
		// The web pod's probes pass: ready, never restarted.
		if st := c.pod(t, pods.web.name); st.ctr().RestartCount != 0 || !st.ctr().Ready {
			t.Errorf("%s with passing probes: %s", pods.web.name, st)
		}
		// A failing liveness probe makes the kubelet restart the container.
		c.waitPod(t, pods.probe.name, "restarted by its liveness probe", func(p *podState) bool { return p.ctr().RestartCount >= 1 })
	})
}

// waitPulled waits for the kubelet's event that it pulled the pod's image
// by the name the pod gives (events reach the API server asynchronously).
func (c *kubeCluster) waitPulled(t *testing.T, pod kubePod) {
	t.Helper()
	image := pod.obj["spec"].(map[string]any)["containers"].([]any)[0].(map[string]any)["image"].(string)
	want := fmt.Sprintf("Successfully pulled image %q", image)
	deadline := time.Now().Add(30 * time.Second)
	for {
		out := c.kubectlOut(t, "-n", kubeNamespace, "get", "events", "--field-selector", "reason=Pulled,involvedObject.name="+pod.name,
			"-o", "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}")
		if strings.Contains(out, want) {
			t.Logf("%s: %s", pod.name, strings.SplitN(strings.TrimSpace(out), "\n", 2)[0])
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no event %q from the kubelet, only %q", pod.name, want, out)
		}
		time.Sleep(time.Second)
	}
}

// checkPortForward forwards a local port to the web pod's 8080 with
// kubectl port-forward (API server, kubelet, CRI's streaming server, the
// pod's network namespace) and reads the page.
func (c *kubeCluster) checkPortForward(t *testing.T, h kubeHandler, pod string) {
	port := freePort(t)
	cmd := c.kubectl("-n", kubeNamespace, "port-forward", "pod/"+pod, fmt.Sprintf("%d:8080", port))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	must(t, cmd.Start(), "kubectl port-forward")
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	if err := waitPort(addr, 30*time.Second); err != nil {
		t.Fatalf("port-forward: %v\n%s", err, out.String())
	}
	want := h.workload.webWant(webWord(h))
	if err := waitHTTP("http://"+addr+h.workload.webPage, want, 30*time.Second); err != nil {
		t.Fatalf("port-forward to %s: %v, want %q\n%s", pod, err, want, out.String())
	}
}

// running is what must not change across a restart of the daemon.
type running struct {
	containerID string
	restarts    int
	startedAt   string
	sandbox     string
}

func (c *kubeCluster) snapshot(t *testing.T, names []string) map[string]running {
	t.Helper()
	out := map[string]running{}
	for _, name := range names {
		p := c.pod(t, name)
		r := running{containerID: p.ctr().ContainerID, restarts: p.ctr().RestartCount}
		if p.ctr().State.Running != nil {
			r.startedAt = p.ctr().State.Running.StartedAt
		}
		for _, sb := range c.sandboxOf(t, p.Metadata.UID) {
			r.sandbox += sb.Id + "/" + sb.State.String() + " "
		}
		out[name] = r
	}
	return out
}

// checkRestart restarts containerd-kuasar under the running kubelet: the
// kubelet gets its runtime back and restarts no pod (same sandboxes, same
// containers, no new restart), and the pods still serve.
func (c *kubeCluster) checkRestart(t *testing.T, sig syscall.Signal, handlers []kubeHandler, pods map[string]*kubePods) {
	var names []string
	for _, h := range handlers {
		p := pods[h.handler]
		names = append(names, p.web.name, p.job.name, p.oom.name)
	}
	before := c.snapshot(t, names)
	c.d.restart(sig)
	c.waitNodeReady()
	c.waitKubeletBack(t, handlers[0], pods[handlers[0].handler].web.name)
	for _, h := range handlers {
		// Served by the new daemon: exec and logs through CRI.
		w, p := h.workload, pods[h.handler]
		if out := c.kubectlOut(t, append([]string{"-n", kubeNamespace, "exec", p.web.name, "--"}, w.exec...)...); !strings.Contains(out, w.execWant) {
			t.Errorf("kubectl exec in %s after the restart: %q", p.web.name, out)
		}
		if out := c.kubectlOut(t, "-n", kubeNamespace, "logs", p.job.name); !strings.Contains(out, "job done by "+h.handler) {
			t.Errorf("kubectl logs %s after the restart: %q", p.job.name, out)
		}
		// The pod still serves, through the new daemon's streaming server.
		if h.gaps["port-forward"] == "" {
			c.checkPortForward(t, h, p.web.name)
		}
	}
	// The kubelet relists the runtime every second and syncs each pod
	// every 10 s (syncFrequency) and at each probe: look for as long as
	// two sync periods that it changes nothing.
	until := time.Now().Add(25 * time.Second)
	for time.Now().Before(until) {
		c.alive()
		now := c.snapshot(t, names)
		for _, name := range names {
			if now[name] != before[name] {
				t.Fatalf("%s changed across the daemon's restart (%v):\nbefore %+v\nafter  %+v", name, sig, before[name], now[name])
			}
		}
		time.Sleep(time.Second)
	}
	for _, h := range handlers {
		p := pods[h.handler]
		if st := c.pod(t, p.web.name); st.condition("Ready") != "True" {
			t.Errorf("%s not ready after the restart: %s", p.web.name, st)
		}
	}
	t.Logf("%d pods unchanged across the daemon's restart by %v", len(names), sig)
}

// waitKubeletBack waits until the kubelet reaches the restarted daemon
// again. Its gRPC connection to the runtime backs off while the daemon is
// down (longer the longer it is down), and until it redials, its CRI calls
// fail at once with the last dial error, as they do on a real node: an
// exec that fails so is tried again, anything else fails the test.
func (c *kubeCluster) waitKubeletBack(t *testing.T, h kubeHandler, pod string) {
	t.Helper()
	begin := time.Now()
	for {
		var out bytes.Buffer
		cmd := c.kubectl(append([]string{"-n", kubeNamespace, "exec", pod, "--"}, h.workload.exec...)...)
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		if err == nil {
			t.Logf("the kubelet reached the restarted daemon %v after it was up", time.Since(begin).Round(100*time.Millisecond))
			return
		}
		if !strings.Contains(out.String(), "code = Unavailable") || time.Since(begin) > 3*time.Minute {
			t.Fatalf("kubectl exec %s after the restart: %v\n%s", pod, err, out.String())
		}
		time.Sleep(time.Second)
	}
}

// checkDeleteAndGC deletes every pod through the API: the kubelet stops
// them, and its garbage collection removes their sandboxes and containers
// from containerd-kuasar; then nothing of them is left on the machine.
func (c *kubeCluster) checkDeleteAndGC(t *testing.T) {
	c.kubectlOut(t, "-n", kubeNamespace, "delete", "pods", "--all", "--wait=true", "--timeout=3m")
	if out := c.kubectlOut(t, "-n", kubeNamespace, "get", "pods", "-o", "name"); strings.TrimSpace(out) != "" {
		t.Fatalf("pods left after delete: %s", out)
	}
	begin := time.Now()
	// The kubelet's container garbage collection runs every minute.
	deadline := time.Now().Add(4 * time.Minute)
	for {
		c.alive()
		sbs, err := c.d.RS.ListPodSandbox(ctx(t), &runtimeapi.ListPodSandboxRequest{})
		must(t, err, "ListPodSandbox")
		ctrs, err := c.d.RS.ListContainers(ctx(t), &runtimeapi.ListContainersRequest{})
		must(t, err, "ListContainers")
		if len(sbs.Items) == 0 && len(ctrs.Containers) == 0 {
			break
		}
		if time.Now().After(deadline) {
			var left []string
			for _, s := range sbs.Items {
				left = append(left, fmt.Sprintf("sandbox %s (%s, %s)", short(s.Id), s.Metadata.GetName(), s.State))
			}
			for _, ct := range ctrs.Containers {
				left = append(left, fmt.Sprintf("container %s (%s, %s)", short(ct.Id), ct.Metadata.GetName(), ct.State))
			}
			t.Fatalf("the kubelet did not collect: %v", left)
		}
		time.Sleep(time.Second)
	}
	t.Logf("the kubelet removed every sandbox and container %v after the pods were deleted", time.Since(begin).Round(time.Second))
	// The kubelet removes the pods' cgroups (which the sandboxes' own
	// cgroups live in) and their folders, volumes unmounted.
	for {
		left := c.podLeftovers()
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("left by the kubelet after its pods went: %v", left)
		}
		time.Sleep(time.Second)
	}
	// What the daemon's pods leave is checked now, with the kubelet still
	// running, and again when the daemon stops.
	c.d.checkLeaks()
}

// podLeftovers lists what of the kubelet's pods is still on the machine:
// pod cgroups (pod<uid>, in any hierarchy), pod folders in its root, links
// to container logs.
func (c *kubeCluster) podLeftovers() []string {
	var left []string
	for _, root := range cgroupRoots() {
		_ = filepath.WalkDir(filepath.Join(root, c.d.CgroupParent), func(p string, e os.DirEntry, err error) error {
			if err == nil && e.IsDir() && strings.HasPrefix(e.Name(), "pod") {
				left = append(left, "cgroup "+p)
				return filepath.SkipDir
			}
			return nil
		})
	}
	entries, _ := os.ReadDir(filepath.Join(c.kubeletRoot(), "pods"))
	for _, e := range entries {
		left = append(left, "pod folder "+e.Name())
	}
	entries, _ = os.ReadDir(kubeContainerLogs)
	for _, e := range entries {
		if target, err := os.Readlink(filepath.Join(kubeContainerLogs, e.Name())); err == nil && strings.HasPrefix(target, c.dir+"/") {
			left = append(left, "log link "+e.Name())
		}
	}
	return left
}
