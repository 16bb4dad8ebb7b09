// referee05: what Drone v0.5.0 would run for a push, a pull request and a
// tag: server/hook.go (branches filter, matrix) then agent/agent.go prep()
// (envsubst, the yaml/transform chain) and exec() (each container of
// services+pipeline matched against its constraints with the running status).
package main

import (
	"encoding/json"
	"fmt"
	"io/ioutil"
	"os"
	"strings"

	"github.com/drone/drone/yaml"
	"github.com/drone/drone/yaml/transform"
	"github.com/drone/envsubst"
)

type stepOut struct {
	Name        string `json:"name"`
	Image       string `json:"image"`
	Service     bool   `json:"service"`
	OnSuccess   bool   `json:"on_success"`
	OnFailure   bool   `json:"on_failure"`
}
type jobOut struct {
	Axis       map[string]string `json:"axis"`
	Containers []stepOut         `json:"containers"`
	CheckError string            `json:"check_untrusted,omitempty"`
	Error      string            `json:"error,omitempty"`
}
type eventOut struct {
	Built  bool     `json:"built"`
	Reason string   `json:"reason,omitempty"`
	Error  string   `json:"error,omitempty"`
	Jobs   []jobOut `json:"jobs"`
}

func main() {
	raw, err := ioutil.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	out := map[string]*eventOut{}
	// os.Args[3], [4]: the branch a pull request and a tag build get (the remote decides)
	prBranch, tagBranch := "master", "master"
	if len(os.Args) > 4 {
		prBranch, tagBranch = os.Args[3], os.Args[4]
	}
	for _, ev := range []struct{ event, ref, branch string }{
		{"push", "refs/heads/master", "master"},
		{"pull_request", "refs/pull/1/head", prBranch},
		{"tag", "refs/tags/v1.0.0", tagBranch},
	} {
		out[ev.event] = build(raw, os.Args[2], ev.event, ev.ref, ev.branch)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	enc.Encode(out)
}

func build(raw []byte, repoName, event, ref, branch string) *eventOut {
	res := &eventOut{Built: true}
	// server/hook.go PostHook
	axes, err := yaml.ParseMatrix(raw)
	if err != nil {
		res.Error = "matrix: " + err.Error()
		return res
	}
	if len(axes) == 0 {
		axes = append(axes, yaml.Axis{})
	}
	branches := yaml.ParseBranch(raw)
	if !branches.Match(branch) && event != "tag" && event != "deployment" {
		res.Built = false
		res.Reason = "Branch does not match restrictions defined in yaml"
		return res
	}
	for i, axis := range axes {
		job := jobOut{Axis: axis}
		parts := strings.SplitN(repoName, "/", 2)
		// agent/agent.go toEnv for this build
		envs := map[string]string{
			"CI": "drone", "DRONE": "true", "DRONE_ARCH": "linux/amd64",
			"DRONE_REPO": repoName, "DRONE_REPO_SCM": "git", "DRONE_REPO_OWNER": parts[0], "DRONE_REPO_NAME": parts[1],
			"DRONE_REPO_LINK": "https://github.com/" + repoName, "DRONE_REPO_AVATAR": "", "DRONE_REPO_BRANCH": "master",
			"DRONE_REPO_PRIVATE": "false", "DRONE_REPO_TRUSTED": "false",
			"DRONE_REMOTE_URL":  "https://github.com/" + repoName + ".git",
			"DRONE_COMMIT_SHA":  "0123456789abcdef0123456789abcdef01234567",
			"DRONE_COMMIT_REF":  ref, "DRONE_COMMIT_REFSPEC": "", "DRONE_COMMIT_BRANCH": branch,
			"DRONE_COMMIT_LINK": "", "DRONE_COMMIT_MESSAGE": "a change", "DRONE_COMMIT_AUTHOR": "someone",
			"DRONE_COMMIT_AUTHOR_EMAIL": "someone@example.com", "DRONE_COMMIT_AUTHOR_AVATAR": "",
			"DRONE_BUILD_NUMBER": "2", "DRONE_BUILD_EVENT": event, "DRONE_BUILD_STATUS": "running",
			"DRONE_BUILD_LINK": "https://drone.example.com/" + repoName + "/2",
			"DRONE_BUILD_CREATED": "1500000000", "DRONE_BUILD_STARTED": "1500000000", "DRONE_BUILD_FINISHED": "0",
			"DRONE_JOB_NUMBER": fmt.Sprint(i + 1), "DRONE_JOB_STATUS": "running", "DRONE_JOB_ERROR": "",
			"DRONE_JOB_EXIT_CODE": "0", "DRONE_JOB_STARTED": "1500000000", "DRONE_JOB_FINISHED": "0",
			"DRONE_YAML_VERIFIED": "true", "DRONE_YAML_SIGNED": "false",
			"DRONE_BRANCH": branch, "DRONE_COMMIT": "0123456789abcdef0123456789abcdef01234567",
			"DRONE_VERSION": "0.5.0",
			"DRONE_PREV_BUILD_STATUS": "success", "DRONE_PREV_BUILD_NUMBER": "1",
			"DRONE_PREV_COMMIT_SHA": "fedcba9876543210fedcba9876543210fedcba98",
		}
		if event == "tag" {
			envs["DRONE_TAG"] = strings.TrimPrefix(ref, "refs/tags/")
		}
		if event == "pull_request" {
			envs["DRONE_PULL_REQUEST"] = "1"
		}
		for k, v := range axis {
			envs[k] = v
		}
		y, err := envsubst.Eval(string(raw), func(s string) string {
			env := envs[s]
			if strings.Contains(env, "\n") {
				env = fmt.Sprintf("%q", env)
			}
			return env
		})
		if err != nil {
			job.Error = "envsubst: " + err.Error()
			res.Jobs = append(res.Jobs, job)
			continue
		}
		conf, err := yaml.ParseString(y)
		if err != nil {
			job.Error = "yaml: " + err.Error()
			res.Jobs = append(res.Jobs, job)
			continue
		}
		transform.Clone(conf, "git")
		transform.Environ(conf, envs)
		transform.DefaultFilter(conf)
		transform.ChangeFilter(conf, "success") // the previous build passed
		transform.Identifier(conf)
		transform.WorkspaceTransform(conf, "/drone", "src/github.com/"+repoName)
		if err := transform.Check(conf, false); err != nil {
			job.CheckError = err.Error()
		}
		if err := transform.Check(conf, true); err != nil {
			job.Error = "check (trusted repo): " + err.Error()
		}
		transform.CommandTransform(conf)
		transform.ImagePull(conf, false)
		transform.ImageTag(conf)
		if err := transform.ImageEscalate(conf, []string{"plugins/docker", "plugins/docker:*",
			"plugins/gcr", "plugins/gcr:*", "plugins/ecr", "plugins/ecr:*"}); err != nil {
			job.Error = "escalate: " + err.Error()
		}
		transform.PluginParams(conf)
		transform.Pod(conf, "linux/amd64")

		// build/config.go Pipeline(): services then pipeline, skipping Disabled;
		// agent exec(): Head().Constraints.Match(platform, deploy, event, branch, status, matrix)
		nsvc := len(conf.Services)
		var all []*yaml.Container
		all = append(all, conf.Services...)
		all = append(all, conf.Pipeline...)
		for idx, c := range all {
			if c.Disabled || c.Name == "ambassador" {
				continue
			}
			so := stepOut{Name: c.Name, Image: c.Image, Service: idx < nsvc}
			so.OnSuccess = c.Constraints.Match("linux/amd64", "", event, branch, "success", axis)
			so.OnFailure = c.Constraints.Match("linux/amd64", "", event, branch, "failure", axis)
			job.Containers = append(job.Containers, so)
		}
		res.Jobs = append(res.Jobs, job)
	}
	return res
}
